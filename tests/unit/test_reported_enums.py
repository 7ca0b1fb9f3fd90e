"""The closed sets reported beside the task, engine and dtype strings."""

from __future__ import annotations

from model_store.interface import CUSTOM, EDIT, IMG2IMG, INPAINT, TEXT2IMG
from service.convert import _enum
from service.generated.diffusion.v1 import diffusion_pb2 as pb


def test_every_reported_string_has_its_enum_value_and_an_unknown_one_is_unspecified():
    tasks = {TEXT2IMG: pb.TASK_TEXT2IMG, IMG2IMG: pb.TASK_IMG2IMG, INPAINT: pb.TASK_INPAINT, EDIT: pb.TASK_EDIT}
    for task, value in {**tasks, CUSTOM: pb.TASK_CUSTOM}.items():
        assert _enum(pb.Task, "TASK", task) == value
    assert _enum(pb.Engine, "ENGINE", "step") == pb.ENGINE_STEP and _enum(pb.Engine, "ENGINE", "request") == 1
    for dtype in ("float32", "float16", "bfloat16", "float64"):
        assert pb.Dtype.Name(_enum(pb.Dtype, "DTYPE", dtype)) == f"DTYPE_{dtype.upper()}"
    assert _enum(pb.Task, "TASK", "video") == pb.TASK_UNSPECIFIED
