"""The store's commands: `sync`, `reindex`, `rollback`, `status`, `snapshot`, `restore` and `serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from visrec.cli_common import JsonFlag, _device, _run, _settings, user_errors
from visrec.cli_output import emit, err, key_value_table, reindex_table, status_table, sync_table
from visrec.errors import InvalidSetting, VisrecError
from visrec.jobs import ReindexJob, RollbackJob, SyncJob
from visrec.plan import Shard


@user_errors
def sync(
    catalogue: Annotated[Path, typer.Argument(help="Catalogue file (.csv or .jsonl).")],
    model: Annotated[Path | None, typer.Option(help="Artefact folder [VISREC_ARTEFACT].")] = None,
    shard: Annotated[
        str, typer.Option(help="i/N: sync only shard i of N (one of N parallel workers).")
    ] = "0/1",
    max_delete: Annotated[
        float | None,
        typer.Option(help="Refuse to delete more than this share of the indexed products [0.2; 1: any]."),
    ] = None,
    checksum: Annotated[
        bool,
        typer.Option(help="Hash every local photo, not only those whose size or modification time changed."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Embed new products and changed photos, update changed metadata in place, delete removed products,
    skip the rest. With `visrec serve` running on the embedded store, the service does it."""
    Shard.parse(shard)  # a bad --shard is said before anything runs
    settings = _settings(artefact=model, **{"ingest.max_delete": max_delete})
    job = SyncJob(
        catalogue=catalogue.absolute(),
        model=settings.artefact.absolute(),
        shard=shard,
        max_delete=settings.ingest.max_delete,
        checksum=checksum,
    )
    data = _run(job, settings, not as_json)
    emit(as_json, data, sync_table("sync", data))


@user_errors
def reindex(
    catalogue: Annotated[Path, typer.Argument(help="Catalogue file (.csv or .jsonl).")],
    model: Annotated[Path, typer.Option(help="The new model's artefact folder.")],
    accept_failures: Annotated[
        bool, typer.Option(help="Go live even if some images failed (listed in the failure report).")
    ] = False,
    max_quality_drop: Annotated[
        float | None,
        typer.Option(
            help="Refuse (exit 3) if the new version's same-category P@10 or mAP@10 is more than this "
            "below the live one's [0.01]."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Go live whatever the quality gate measures (the figures are still shown).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Build the next version of the collection with a new model, measure it against the live one
    (same-category P@10 and mAP@10 on the same products), then make it live in one atomic switch unless
    it is worse; the previous version stays for `visrec rollback`. With `visrec serve` running on the
    embedded store, the service does it."""
    settings = _settings(artefact=model, **{"gate.max_quality_drop": max_quality_drop})
    job = ReindexJob(
        catalogue=catalogue.absolute(),
        model=settings.artefact.absolute(),
        max_quality_drop=settings.gate.max_quality_drop,
        force=force,
        accept_failures=accept_failures,
    )
    data = _run(job, settings, not as_json)
    emit(as_json, data, reindex_table(data))


@user_errors
def rollback(
    force: Annotated[
        bool,
        typer.Option(
            help="Roll back even if products written since the switch would be lost from the "
            "restored version."
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Make the previous version of the collection live again (after a `reindex`)."""
    data = _run(RollbackJob(force=force), _settings(), False)
    emit(as_json, data, key_value_table("rollback", data))


@user_errors
def status(as_json: JsonFlag = False) -> None:
    """What is indexed, where, and which model made it."""
    from visrec.jobs import StatusJob
    from visrec.manifest import read_manifest

    settings = _settings()
    indexed = _run(StatusJob(), settings, False)
    where = settings.qdrant.url or str(settings.qdrant.path)
    problems = []
    if not indexed["versions"]:  # a report, not a failure (exit 0), but said: a typo'd store looks empty
        problems.append(
            f"nothing is indexed in {where} (collection {settings.qdrant.collection!r}): "
            "`visrec sync CATALOGUE` makes it"
        )
    try:
        manifest = read_manifest(settings.artefact)
        model_info: dict[str, Any] = {"model_version": manifest.model_version, "metrics": manifest.metrics}
    except VisrecError as exc:
        model_info = {"model_version": None}
        problems.append(str(exc))
    data = {
        "store": where,
        "collection": settings.qdrant.collection,
        **indexed,
        "artefact": str(settings.artefact),
        **model_info,
        **({"problem": "; ".join(problems)} if problems else {}),
    }
    emit(as_json, data, status_table(data))


@user_errors
def snapshot(
    folder: Annotated[Path, typer.Argument(help="Folder to write the snapshot into (made if missing).")],
    keep: Annotated[
        int | None, typer.Option(help="Then keep only the newest N snapshots of this collection in FOLDER.")
    ] = None,
    with_model: Annotated[
        bool,
        typer.Option(help="Carry the model's artefact too: restorable where that model is not deployed."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Write the live version into one self-contained archive (points, version record, the model that built
    it, the cut it holds), with a checksum file beside it. With `visrec serve` running on the embedded
    store, the service takes it: writes wait only while it copies the live version, reads never."""
    from visrec.jobs import SnapshotJob

    if keep is not None and keep < 1:
        raise InvalidSetting(f"--keep {keep}: keep at least 1 snapshot")
    job = SnapshotJob(out=folder.absolute(), keep=keep, with_model=with_model)
    data = _run(job, _settings(), not as_json)
    emit(as_json, data, key_value_table("snapshot", data))


@user_errors
def restore(
    snapshot: Annotated[Path, typer.Argument(help="A snapshot file (its .sha256 file beside it).")],
    force: Annotated[
        bool, typer.Option(help="Restore even if products written since the snapshot are dropped.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Make a snapshot the live version: built beside the live one and switched to in one step
    (`visrec rollback` undoes it). Refuses a damaged snapshot, a model that is not here, and, unless
    --force, dropping products written since the snapshot. With `visrec serve` running, the service
    does it."""
    from visrec.jobs import RestoreJob

    data = _run(RestoreJob(snapshot=snapshot.absolute(), force=force), _settings(), not as_json)
    emit(as_json, data, key_value_table("restore", data))


@user_errors
def serve(
    host: Annotated[str | None, typer.Option(help="Interface [VISREC_API__HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [VISREC_API__PORT].")] = None,
    insecure: Annotated[
        bool, typer.Option(help="Listen beyond loopback without an API key [VISREC_API__INSECURE].")
    ] = False,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs)."""
    from visrec.api import run

    settings = _settings(**{"api.host": host, "api.port": port, "api.insecure": insecure or None})
    run(settings, _device(settings), lambda lines: err.print(lines, highlight=False, soft_wrap=True))
