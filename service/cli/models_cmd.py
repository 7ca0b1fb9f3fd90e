"""`diffusers-grpc models ...`: manage the local model store."""

from __future__ import annotations

import argparse
from typing import Any

from model_store import Model, ModelStore, StoreError
from model_store.demo import DEMO_NAME

from .common import CliError, print_json


def register(commands: Any) -> None:
    parser = commands.add_parser("models", help="manage the local model store ($DIFFUSERS_GRPC_HOME)")
    sub = parser.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    demo = sub.add_parser("create-demo", help="build the tiny offline demo pipeline and import it")
    demo.add_argument("name", nargs="?", default=DEMO_NAME, help=f"model name (default {DEMO_NAME})")
    demo.add_argument("--force", action="store_true", help="import a new version even if the name exists")
    demo.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same weights)")
    demo.set_defaults(run=create_demo)

    lister = sub.add_parser("list", help="list stored models")
    lister.add_argument("--json", action="store_true", help="machine-readable output")
    lister.set_defaults(run=list_models)

    getter = sub.add_parser("get", help="show one model")
    getter.add_argument("tag")
    getter.add_argument("--json", action="store_true", help="machine-readable output")
    getter.set_defaults(run=get_model)

    importer = sub.add_parser("import", help="import a pipeline folder or hub id")
    importer.add_argument("name")
    importer.add_argument("source", help="a local diffusers pipeline folder or a hub id (resolved offline-first)")
    importer.add_argument(
        "--signature",
        action="append",
        default=[],
        metavar="METHOD[:batchable[:BATCH_DIM]]",
        help="a served method; repeatable (default: __call__, not batchable)",
    )
    importer.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="SIGNATURE=TASK",
        help="the task of a signature (text2img, img2img, inpaint or custom), instead of the one its parameters "
        "suggest; repeatable",
    )
    importer.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a load option stored with the model and applied when it is served (torch_dtype, variant, scheduler, "
        "attention_slicing, vae_slicing, vae_tiling, cpu_offload=none|model|sequential); repeatable",
    )
    importer.add_argument("--label", action="append", default=[], metavar="K=V")
    importer.add_argument("--metadata", action="append", default=[], metavar="K=V")
    importer.add_argument("--pipeline-class")
    importer.add_argument("--variant")
    importer.add_argument("--revision")
    importer.add_argument("--version", help="pin the version instead of generating one")
    importer.add_argument("--custom-pipeline", help="a local .py file whose DiffusionPipeline subclass is used")
    importer.add_argument("--trust-remote-code", action="store_true", help="allow --custom-pipeline code to run")
    importer.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .bin/.ckpt weights with no safetensors (pickle can run code)",
    )
    importer.add_argument("--json", action="store_true", help="machine-readable output")
    importer.set_defaults(run=import_model)

    lora = sub.add_parser("import-lora", help="store LoRA weights for a base model (chosen per request)")
    lora.add_argument("name")
    lora.add_argument("source", help="a .safetensors file, a folder holding one, or a hub id (offline-first)")
    lora.add_argument("--base", required=True, help="the name of the stored model it fits")
    lora.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weights (pickle can run code)")
    lora.add_argument("--version", help="pin the version instead of generating one")
    lora.add_argument("--max-size-gb", type=float, default=4.0, help="refuse weights larger than this (default 4)")
    lora.set_defaults(run=import_lora)

    embedding = sub.add_parser("import-embedding", help="store a textual-inversion embedding for a base model")
    embedding.add_argument("name")
    embedding.add_argument("source", help="a .safetensors file, a folder holding one, or a hub id (offline-first)")
    embedding.add_argument("--base", required=True, help="the name of the stored model it fits")
    embedding.add_argument("--token", required=True, help="the token prompts use it by, such as <my-style>")
    embedding.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weights (pickle can run code)")
    embedding.add_argument("--version", help="pin the version instead of generating one")
    embedding.add_argument("--max-size-gb", type=float, default=4.0, help="refuse weights larger than this (default 4)")
    embedding.set_defaults(run=import_embedding)

    exporter = sub.add_parser("export", help="write a model as a .tar.gz archive (a path or s3://bucket/key)")
    exporter.add_argument("tag")
    exporter.add_argument("dest")
    exporter.set_defaults(run=export_model)

    archive = sub.add_parser("import-archive", help="import a model archive (a path or s3://bucket/key)")
    archive.add_argument("src")
    archive.add_argument("--overwrite", action="store_true", help="replace the model if its tag exists")
    archive.add_argument(
        "--trust-remote-code", action="store_true", help="accept an archive whose model ships custom pipeline code"
    )
    archive.add_argument(
        "--max-size-gb", type=float, default=64.0, help="refuse an archive that unpacks to more (default 64)"
    )
    archive.set_defaults(run=import_archive)

    deleter = sub.add_parser("delete", help="delete a model version")
    deleter.add_argument("tag")
    deleter.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    deleter.set_defaults(run=delete_model)


def create_demo(args: argparse.Namespace) -> int:
    from model_store.demo import save_demo

    store = ModelStore()
    existing = store.list_models(args.name)
    if existing and not args.force:
        print(f"{existing[-1].tag} already exists (use --force for a new version)")
        return 0
    model = _store_call(
        lambda: save_demo(store, args.name, args.seed, labels={"demo": "true"}, metadata={"seed": args.seed})
    )
    print(f"imported {model.tag} into {store.home}")
    return 0


def list_models(args: argparse.Namespace) -> int:
    """Every model and adapter; entries that cannot be read, and adapters a server would not serve, say why."""
    from model_store.adapters import adapter_problem

    store = ModelStore()
    models, broken = store.scan()
    # As a server without --allow-pickle sees them (the message says what the flag would change).
    problems = {m.tag: adapter_problem(m, allow_pickle=False, full=False) for m in models if m.info.is_adapter}
    if args.json:
        listed = [_summary(m) | ({"problem": problems[m.tag]} if problems.get(m.tag) else {}) for m in models]
        print_json(listed + [{"path": str(path), "problem": why} for path, why in broken])
        return 0
    if not models and not broken:
        print("no models; try: diffusers-grpc models create-demo")
        return 0
    print(f"{'TAG':<48} {'KIND':<10} {'PIPELINE / BASE':<32} {'SIGNATURES / TOKEN':<32} CREATED")
    for m in models:
        what = m.info.adapter.get("base", "") if m.info.is_adapter else m.info.pipeline_class
        uses = m.info.adapter.get("token", "") if m.info.is_adapter else ",".join(m.signatures)
        print(f"{m.tag:<48} {m.info.kind:<10} {what!s:<32} {uses!s:<32} {m.info.created[:19]}")
        if problems.get(m.tag):
            print(f"  broken: {problems[m.tag]}")
    for path, why in broken:
        print(f"{path.parent.name + ':' + path.name:<48} {'broken':<10} {why}")
    return 0


def get_model(args: argparse.Namespace) -> int:
    model = _store_call(lambda: ModelStore().get(args.tag))
    if args.json:
        print_json(model.info.to_dict() | {"tag": model.tag, "path": str(model.path)})
        return 0
    print(f"tag:       {model.tag}\npath:      {model.path}\nkind:      {model.info.kind}")
    if model.info.is_adapter:
        print("\n".join(f"{key + ':':<10} {value}" for key, value in model.info.adapter.items()))
    else:
        print(f"pipeline:  {model.info.pipeline_class}")
    print(f"created:   {model.info.created}")
    for sig in model.signatures.values():
        print(f"signature: {sig.name} (task {sig.task}, batchable {sig.batchable}, batch_dim {sig.batch_dim})")
    for key, value in model.effective_options().shown().items():
        print(f"option:    {key}={value}")
    for key, value in model.info.labels.items():
        print(f"label:     {key}={value}")
    return 0


def import_model(args: argparse.Namespace) -> int:
    from model_store.options import parse_option

    signatures = dict(parse_signature(s) for s in args.signature) or None
    options = dict(_store_call(lambda: [parse_option(text) for text in args.option]))
    model = _store_call(
        lambda: ModelStore().import_model(
            args.name,
            args.source,
            signatures=signatures,
            tasks=_pairs(args.task, "--task"),
            options=options,
            labels=_pairs(args.label, "--label"),
            metadata=_pairs(args.metadata, "--metadata"),
            pipeline_class=args.pipeline_class,
            variant=args.variant,
            revision=args.revision,
            version=args.version,
            custom_pipeline=args.custom_pipeline,
            trust_remote_code=args.trust_remote_code,
            allow_pickle=args.allow_pickle,
        )
    )
    if args.json:
        print_json(_summary(model))
    else:
        print(f"imported {model.tag}")
    return 0


def import_lora(args: argparse.Namespace) -> int:
    from model_store.adapters import import_lora as load

    model = _store_call(
        lambda: load(
            ModelStore(),
            args.name,
            args.source,
            args.base,
            allow_pickle=args.allow_pickle,
            version=args.version,
            max_bytes=int(args.max_size_gb * 2**30),
        )
    )
    print(f"imported {model.tag} (lora for {args.base})")
    return 0


def import_embedding(args: argparse.Namespace) -> int:
    from model_store.adapters import import_embedding as load

    model = _store_call(
        lambda: load(
            ModelStore(),
            args.name,
            args.source,
            args.base,
            args.token,
            allow_pickle=args.allow_pickle,
            version=args.version,
            max_bytes=int(args.max_size_gb * 2**30),
        )
    )
    print(f"imported {model.tag} (embedding {args.token} for {args.base})")
    return 0


def export_model(args: argparse.Namespace) -> int:
    from model_store.archive import export_model as export

    model = _store_call(lambda: export(ModelStore(), args.tag, args.dest))
    print(f"exported {model.tag} to {args.dest}")
    return 0


def import_archive(args: argparse.Namespace) -> int:
    from model_store.archive import import_archive as load

    model = _store_call(
        lambda: load(
            ModelStore(),
            args.src,
            overwrite=args.overwrite,
            trust_remote_code=args.trust_remote_code,
            max_bytes=int(args.max_size_gb * 2**30),
        )
    )
    print(f"imported {model.tag} from {args.src}")
    return 0


def delete_model(args: argparse.Namespace) -> int:
    store = ModelStore()
    model = _store_call(lambda: store.get(args.tag))
    if not args.yes:
        answer = input(f"delete {model.tag}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    _store_call(lambda: store.delete(model.tag))
    print(f"deleted {model.tag}")
    return 0


def parse_signature(text: str) -> tuple[str, dict[str, Any]]:
    """`METHOD[:batchable[:BATCH_DIM]]` -> (method, options)."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise CliError(f"--signature {text!r}: expected METHOD[:batchable[:BATCH_DIM]]")
    options: dict[str, Any] = {"batchable": False}
    if len(parts) >= 2:
        if parts[1] not in ("batchable", "true", "false", ""):
            raise CliError(f"--signature {text!r}: the second part must be 'batchable'")
        options["batchable"] = parts[1] in ("batchable", "true")
    if len(parts) == 3:
        try:
            options["batch_dim"] = int(parts[2])
        except ValueError:
            raise CliError(f"--signature {text!r}: BATCH_DIM must be an integer") from None
    return parts[0], options


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    result = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise CliError(f"{flag} {value!r}: expected K=V")
        result[key] = val
    return result


def _summary(model: Model) -> dict[str, Any]:
    return {
        "tag": model.tag,
        "kind": model.info.kind,
        "pipeline_class": model.info.pipeline_class,
        "created": model.info.created,
        "signatures": {name: sig.to_dict() for name, sig in model.signatures.items()},
        "labels": dict(model.info.labels),
        "options": model.effective_options().shown(),
    }


def _store_call(action: Any) -> Any:
    """Run a store action; what goes wrong for a reason the user can fix is one line, not a traceback."""
    try:
        return action()
    except StoreError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:  # a missing or unreadable file or folder, a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        raise CliError(f"{where}{exc.strerror or exc}") from None
