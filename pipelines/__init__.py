"""The diffusers side of serving: what runs on a worker's device.

- `worker.PipelineWorker`: one executor worker's backend: its device's replica of every served model, and the
  engines that run work on them.
- `request_engine.RequestEngine`: request batching, one whole pipeline call per batch.
- `device.Device`: the worker's device context (inference mode, its own CUDA stream).

Imports batching (work items, results) and model_store (loaded models); never gRPC. torch and diffusers are
imported lazily inside the functions that need them.
"""
