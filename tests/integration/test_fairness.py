"""Fairness between clients on a real server: one client's flood neither locks another out of the queue nor
delays its first image behind the flood's backlog. The worker is held at a gate while the queue fills, so the
order is deterministic."""

from __future__ import annotations

import grpc
import pytest
from helpers import wait_for
from inprocess import Gate, running_server

from service.client import DiffusionClient
from service.generated.diffusion.v1 import diffusion_pb2 as pb

HEADER = "x-client"


def request(seed: int, prompt: str = "x") -> pb.TextToImageRequest:
    return pb.TextToImageRequest(prompt=prompt, params=pb.GenerationParams(seed=seed, num_inference_steps=2))


@pytest.mark.parametrize("batching", ["request", "step"])
def test_a_flooding_client_cannot_lock_out_another_and_does_not_go_first(store, batching):
    gate = Gate()
    config = {"max_queue": 16, "max_batch_size": 2, "client_id_header": HEADER, "batching": batching}
    with (
        running_server(store, factory=gate.factory, **config) as (server, target),
        DiffusionClient(target, metadata={HEADER: "flood"}) as flood,
        DiffusionClient(target, metadata={HEADER: "polite"}) as polite,
    ):
        first = flood.stub.TextToImage.future(request(0), timeout=120, metadata=flood.metadata)
        assert gate.entered.wait(60)  # the worker holds the flood's first call: everything else queues
        backlog, refused = [], None
        for seed in range(1, 40):  # alone, the flood may use the queue up to what keeps a share (4) free
            call = flood.stub.TextToImage.future(request(seed), timeout=120, metadata=flood.metadata)
            queued = len(backlog) + 1
            wait_for(
                lambda call=call, queued=queued: call.done() or len(server.executor.queue) == queued,
                what="queued or refused",
            )
            if call.done():
                refused = call.exception()
                break
            backlog.append(call)
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(backlog) == 16 - 4 and len(server.executor.queue) == 12
        send = polite.stub.TextToImage.future
        mine = [send(request(100 + i), timeout=120, metadata=polite.metadata) for i in range(4)]
        again = flood.stub.TextToImage.future(request(99), timeout=120, metadata=flood.metadata)
        assert again.exception(timeout=60).code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # others wait now
        # The polite calls are queued before the worker goes on (on a loaded machine their validation can lag)
        wait_for(lambda: len(server.executor.queue) == 12 + 4, what="the polite calls to queue")
        finished: list[str] = []
        for name, calls in (("flood", [first, *backlog]), ("polite", mine)):
            for call in calls:
                call.add_done_callback(lambda _, name=name: finished.append(name))
        gate.release.set()
        assert all(call.result(timeout=120).images for call in [first, *backlog, *mine])
    # Round-robin across clients: the polite client's four images are served among the flood's first few, not
    # after its backlog of twelve. The queue forgets the turn of a client with nothing queued, and ties go to the
    # oldest item, so up to three flood images (the held one, then the backlog's oldest) may finish first.
    assert finished.index("polite") <= 3, finished
    assert max(i for i, name in enumerate(finished) if name == "polite") < 10, finished


def test_step_work_whose_deadline_cannot_cover_its_steps_is_refused_before_it_queues(store):
    with running_server(store, batching="step") as (server, target), DiffusionClient(target) as client:
        client.text_to_image("x", seed=1, steps=8, timeout=60)  # the engine learns how fast a step can be
        fastest = min(server.executor._fastest_tick.values())
        steps = 150
        budget = fastest * steps / 3  # a third of what even its fastest steps take
        with pytest.raises(grpc.RpcError) as caught:
            client.text_to_image("x", seed=2, steps=steps, timeout=budget)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "its run takes about" in caught.value.details()  # said at once by the server, not the client's clock
