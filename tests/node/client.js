// A Node.js client of diffusion.v1.DiffusionService, built from the .proto at run time (@grpc/proto-loader).
// Usage: node tests/node/client.js HOST:PORT
// Prints one JSON line: what TextToImage, Stream and Call returned, for the Python test to check.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const root = path.resolve(__dirname, "..", "..");
const definition = protoLoader.loadSync(path.join(root, "protos", "diffusion", "v1", "diffusion.proto"), {
  keepCase: false,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [path.join(root, "protos")],
});
const diffusion = grpc.loadPackageDefinition(definition).diffusion.v1;
const client = new diffusion.DiffusionService(process.argv[2], grpc.credentials.createInsecure(), {
  "grpc.max_receive_message_length": 64 * 1024 * 1024,
});

function textToImage() {
  return new Promise((resolve, reject) => {
    const request = { prompt: "a lighthouse", params: { seed: "77", numInferenceSteps: 3 } };
    client.TextToImage(request, { deadline: Date.now() + 60000 }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

function stream() {
  return new Promise((resolve, reject) => {
    const steps = [];
    let result = null;
    const call = client.Stream({ textToImage: { prompt: "a lighthouse", params: { seed: "77", numInferenceSteps: 3 } } });
    call.on("data", (event) => {
      if (event.event === "progress") steps.push(event.progress.step);
      else result = event[event.event];
    });
    call.on("error", reject);
    call.on("end", () => resolve({ steps, result }));
  });
}

// Call's `arguments` is a google.protobuf.Struct: with proto-loader, each value is a Value message of its kind
// (stringValue, numberValue, boolValue, listValue, structValue). Integral numbers reach int parameters as ints.
function call() {
  return new Promise((resolve, reject) => {
    const request = {
      signature: "__call__",
      arguments: { fields: { prompt: { stringValue: "a lighthouse" }, num_inference_steps: { numberValue: 3 } } },
      seed: "77",
    };
    client.Call(request, { deadline: Date.now() + 60000 }, (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

(async () => {
  const unary = await textToImage();
  const streamed = await stream();
  const called = await call();
  const image = unary.images[0];
  console.log(
    JSON.stringify({
      model: unary.model,
      seed: image.seed,
      width: image.image.width,
      height: image.image.height,
      png: image.image.data.subarray(1, 4).toString("latin1"),
      data: image.image.data.toString("base64"),
      steps: streamed.steps,
      streamedData: streamed.result.images[0].image.data.toString("base64"),
      callSeed: called.images[0].seed,
      callWidth: called.images[0].image.width,
    })
  );
  client.close();
})().catch((error) => {
  console.error(error);
  process.exit(1);
});
