"""`visrec neighbours` (issue #31): every product's list equals `visrec similar ID` under the same rules on
both backends; a delta on a previous feed's state makes previous + delta == a full feed now, after any
edits, and queries again only the lists an edit can reach; a killed feed leaves the previous one; the
CSV and Parquet forms read back. Real embedded engine, the session's real small model, real processes."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.faults.helpers import run_visrec, settings_env, spawn_visrec
from tests.helpers import COLOURS, SHAPES, draw_product, run_sync, small_settings, write_csv
from tests.test_class_matrix import _assert_delta_makes_now
from visrec import query
from visrec.artefact import Manifest
from visrec.cli import app
from visrec.config import QdrantSettings, Settings
from visrec.feed import state_path
from visrec.feed_run import make_feed
from visrec.filters import Filters
from visrec.fs import copy_tree_sparse
from visrec.index import IndexPoint, VectorIndex, open_index
from visrec.neighbours import FeedRules
from visrec.rules import Rules

Feed = dict[str, list[tuple[str, float, int]]]  # product id → (neighbour, distance, matched photo)
PRODUCTS = 15


def catalogue_rows(n: int, root: Path) -> list[dict[str, Any]]:
    """`n` drawn products p0…: category = shape, with colour, price and brand."""
    rows = []
    for i in range(n):
        shape, colour = SHAPES[i % 3], list(COLOURS)[(i // 3) % 3]
        draw_product(root / "images" / f"p{i}.png", shape, colour, variant=i)
        rows.append(
            {
                "id": f"p{i}",
                "image": f"images/p{i}.png",
                "category": shape,
                "colour": colour,
                "price": 10 + i,
                "brand": "acme" if i % 2 else "zeta",
            }
        )
    return rows


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory, artefact: tuple[Path, Manifest]) -> Settings:
    """A store of PRODUCTS drawn products, synced once for the module (tests copy it to write)."""
    root = tmp_path_factory.mktemp("neighbours")
    settings = small_settings(root, artefact=artefact[0])
    summary = run_sync(write_csv(root / "catalogue.csv", catalogue_rows(PRODUCTS, root)), settings)
    assert summary.added == PRODUCTS and not summary.failed
    return settings


def read_jsonl(path: Path) -> dict[str, Any]:
    """product id → its list as (neighbour, distance, matched) tuples, or "deleted"."""
    found: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        assert entry["product_id"] not in found, "one line a product"
        if entry.get("deleted"):
            found[entry["product_id"]] = "deleted"
        else:
            found[entry["product_id"]] = [
                (n["product_id"], n["distance"], n["matched_image"]) for n in entry["neighbours"]
            ]
    return found


def applied(previous: Feed, delta: dict[str, Any]) -> Feed:
    out = dict(previous)
    for product_id, lists in delta.items():
        if lists == "deleted":
            out.pop(product_id, None)
        else:
            out[product_id] = lists
    return out


def close(a: Feed, b: Feed) -> bool:
    """The same lists (ids and photos; distances to float32 precision)."""
    if a.keys() != b.keys():
        return False
    return all(
        [(n, m) for n, _, m in a[p]] == [(n, m) for n, _, m in b[p]]
        and np.allclose([d for _, d, _ in a[p]], [d for _, d, _ in b[p]], rtol=1e-5, atol=1e-5)
        for p in a
    )


# --- a feed's lists are `similar`'s ---------------------------------------------------------------------

RULE_SETS: dict[str, dict[str, Any]] = {
    "nearest": {"k": 5},
    "same category": {"k": 4, "same": ("category",)},
    "filtered, diverse, capped": {
        "k": 3,
        "filters": Filters(colour=["red", "green"]),
        "rules": Rules(diversity=0.5, max_per=["brand=1"]),
    },
    "colour re-rank, same brand": {"k": 3, "colour_weight": 0.6, "same": ("brand",)},
}


@pytest.fixture(params=["embedded", "server-local"])
def backend(request: pytest.FixtureRequest, synced: Settings, tmp_path: Path) -> Iterator[VectorIndex]:
    """The module's products on the embedded engine, or copied point by point into qdrant-client's
    local mode (the server backend's code)."""
    if request.param == "embedded":
        with open_index(synced.qdrant) as index:
            yield index
        return
    with open_index(synced.qdrant) as source:
        points = source.points([f"p{i}" for i in range(PRODUCTS)])
        dim = points[0].photo_vectors.shape[1]
    with open_index(QdrantSettings(url=":memory:", collection="feed")) as index:
        index.create(dim)
        index.upsert(points)
        yield index


@pytest.mark.parametrize("rule_set", list(RULE_SETS))
def test_each_list_is_what_similar_answers(backend: VectorIndex, rule_set: str, tmp_path: Path) -> None:
    rules = FeedRules(**RULE_SETS[rule_set])
    out = tmp_path / "feed.jsonl"
    summary = make_feed(backend, rules, out, "jsonl")
    feed = read_jsonl(out)
    listed = {p for p, _ in backend.browse(rules.filters, 100)[0]}
    assert set(feed) == listed and summary["products"] == len(listed) and summary["queried"] == len(listed)
    scored = 0
    for product_id, lists in feed.items():
        payload = backend.payloads([product_id])[product_id]
        filters = rules.filters
        if rules.same:
            filters = filters.model_copy(update={"equals": {f: payload[f] for f in rules.same}})
        hits = query.similar_to_product(
            backend, product_id, rules.k, filters, rules.colour_weight, rules.rules
        )
        assert [(h.product_id, h.matched) for h in hits] == [(n, m) for n, _, m in lists], product_id
        assert np.allclose([h.distance for h in hits], [d for _, d, _ in lists], rtol=1e-6)
    for line in out.read_text().splitlines():
        scored += sum("score" in n for n in json.loads(line)["neighbours"])
    assert bool(scored) == bool(rules.colour_weight)  # the re-rank's blend, where it ranks


# --- the command: formats, refusals, a kill ------------------------------------------------------------


def test_the_command_writes_every_format_and_similar_agrees(synced: Settings, tmp_path: Path) -> None:
    common = ["-k", "3", "--same", "category", "--json"]
    done = {}
    for name in ("feed.jsonl", "feed.csv", "feed.parquet"):
        ran = run_visrec(synced, "neighbours", "--out", str(tmp_path / name), *common)
        assert ran.returncode == 0, ran.stderr
        done[name] = json.loads(ran.stdout)
    summary = done["feed.jsonl"]
    assert (
        summary["kind"] == "full" and summary["products"] == PRODUCTS and summary["lists_written"] == PRODUCTS
    )
    assert summary["format"] == "jsonl" and done["feed.parquet"]["format"] == "parquet"
    assert state_path(tmp_path / "feed.jsonl").is_file()
    feed = read_jsonl(tmp_path / "feed.jsonl")
    with (tmp_path / "feed.csv").open(newline="") as f:
        csv_rows = [
            (
                r["product_id"],
                int(r["rank"]),
                r["neighbour_id"],
                float(r["distance"]),
                int(r["matched_image"]),
                r["deleted"],
            )
            for r in csv.DictReader(f)
        ]
    table = pq.read_table(tmp_path / "feed.parquet").to_pylist()
    parquet_rows = [
        (
            r["product_id"],
            r["rank"],
            r["neighbour_id"],
            r["distance"],
            r["matched_image"],
            "true" if r["deleted"] else "false",
        )
        for r in table
    ]
    expected = [
        (p, rank, n, d, m, "false") for p, lists in feed.items() for rank, (n, d, m) in enumerate(lists, 1)
    ]
    assert sorted(csv_rows) == sorted(parquet_rows) == sorted(expected)
    similar = run_visrec(synced, "similar", "p4", "-k", "3", "--category", "square", "--json")
    assert [(h["product_id"], h["matched_image"]) for h in json.loads(similar.stdout)] == [
        (n, m) for n, _, m in feed["p4"]
    ]


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["-k", "0"], "k must be between 1", 2),
        (["--same", "categry"], "no product has a field 'categry' for --same (did you mean 'category'?)", 2),
        (["--category", "hexagon"], "no product has category 'hexagon'", 2),
        (["--format", "xml"], "--format takes jsonl, csv, parquet", 2),
        (["--since", "{tmp}/nothing.jsonl"], "has no state beside it", 2),
        (["--since", "{tmp}/base.jsonl", "-k", "4"], "made with other options (k 3", 2),
        (["--since", "{tmp}/base.jsonl", "-k", "3", "--diversity", "0.3"], "--since tracks nearest-first", 2),
        (["--out", "{tmp}"], "is a folder", 2),
    ],
)
def test_mistakes_are_one_line_and_an_exit_code(
    synced: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
    code: int,
) -> None:
    for name, value in settings_env(synced).items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    base = runner.invoke(app, ["neighbours", "--out", str(tmp_path / "base.jsonl"), "-k", "3", "--json"])
    assert base.exit_code == 0, base.output
    filled = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--out" in filled else ["--out", str(tmp_path / "next.jsonl")]
    result = runner.invoke(app, ["neighbours", *out, *filled])
    assert result.exit_code == code, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda lines: lines[:3] + [b'{"id": "p1", "fp"\n'] + lines[4:], "is damaged at byte"),
        (lambda lines: lines[:3] + [b'{"id": "p1"}\n'] + lines[4:], "is damaged at byte"),
        (lambda lines: lines[:3] + [b"[1, 2]\n"] + lines[4:], "is damaged at byte"),
        (lambda lines: lines[:-1], "is unfinished"),
        (lambda lines: lines[:-1] + [lines[-1][:-9] + b"\n"], "cannot be read"),
        (lambda lines: lines[:1], "is unfinished"),
        (
            lambda lines: [*lines[:2], lines[2].replace(b'"p', b'"q', 2), *lines[3:]],
            "changed after it was written",
        ),
        (
            lambda lines: [*lines[:-2], lines[-2].replace(b'"n":', b'"n" :', 1), lines[-1]],
            "changed after it was written",
        ),
    ],
)
def test_a_damaged_state_is_refused_in_one_line(
    synced: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: Any, message: str
) -> None:
    """A state edited or cut after it was written: `--since` refuses it (exit 2, one line, make a full
    feed), wherever the damage lies, and writes nothing."""
    for name, value in settings_env(synced).items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    base = tmp_path / "base.jsonl"
    assert runner.invoke(app, ["neighbours", "--out", str(base), "-k", "3"]).exit_code == 0
    lines = state_path(base).read_bytes().splitlines(keepends=True)
    state_path(base).write_bytes(b"".join(damage(lines)))
    result = runner.invoke(
        app, ["neighbours", "--out", str(tmp_path / "d.jsonl"), "-k", "3", "--since", str(base)]
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "make a full feed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "d.jsonl").exists()


def test_parquet_without_pyarrow_names_the_extra(
    synced: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in settings_env(synced).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as where it is not installed: import fails
    result = CliRunner().invoke(app, ["neighbours", "--out", str(tmp_path / "f.parquet")])
    assert result.exit_code == 2 and "visrec's `parquet` extra" in result.stderr


def test_a_killed_feed_leaves_the_previous_one(tmp_path: Path) -> None:
    """A feed stopped by SIGKILL half-way leaves the previous feed and its state as they were, and a
    delta on them still runs."""
    settings = small_settings(tmp_path)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((6000, 32)).astype(np.float32)  # a few seconds of searches
    with open_index(settings.qdrant) as index:
        index.create(32)
        index.upsert(
            [
                IndexPoint(f"r{i}", vectors[i], {"product_id": f"r{i}", "vectors_hash": f"h{i}"})
                for i in range(len(vectors))
            ]
        )
        make_feed(index, FeedRules(k=5), tmp_path / "feed.jsonl", "jsonl")
    before = {p: p.read_bytes() for p in (tmp_path / "feed.jsonl", state_path(tmp_path / "feed.jsonl"))}
    running = spawn_visrec(
        settings_env(settings),
        tmp_path / "killed.log",
        tmp_path,
        "neighbours",
        "--out",
        "feed.jsonl",
        "-k",
        "5",
    )
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size for p in tmp_path.glob(".feed.jsonl.*.tmp")):  # half-way: writing
        assert running.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
        time.sleep(0.01)
    running.kill()
    assert running.wait(30) == -signal.SIGKILL
    assert {p: p.read_bytes() for p in before} == before
    again = run_visrec(
        settings,
        "neighbours",
        "--out",
        str(tmp_path / "delta.jsonl"),
        "-k",
        "5",
        "--since",
        str(tmp_path / "feed.jsonl"),
        "--json",
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["lists_written"] == 0 and (tmp_path / "delta.jsonl").read_text() == ""


# --- deltas ---------------------------------------------------------------------------------------------

Edit = tuple[str, int]  # (kind, which product)
edits = st.lists(
    st.tuples(st.sampled_from(["photo", "add", "remove", "category", "price"]), st.integers(0, 40)),
    min_size=1,
    max_size=3,
)


def edited(rows: list[dict[str, Any]], chosen: list[Edit], root: Path, step: int) -> list[dict[str, Any]]:
    rows = [dict(r) for r in rows]
    for kind, n in chosen:
        i = n % len(rows)
        if kind == "photo":
            shape, colour = SHAPES[(n + step) % 3], list(COLOURS)[(n // 3 + step + 1) % 3]
            name = f"images/{rows[i]['id']}-{step}-{n}.png"
            draw_product(root / name, shape, colour, variant=n + 7 * step)
            rows[i]["image"] = name
        elif kind == "add":
            new = f"n{step}-{n}"
            draw_product(root / "images" / f"{new}.png", SHAPES[n % 3], list(COLOURS)[n % 3], variant=n + 3)
            rows.append({**rows[i], "id": new, "image": f"images/{new}.png"})
        elif kind == "remove" and len(rows) > 4:
            rows.pop(i)
        elif kind == "category":
            rows[i]["category"] = SHAPES[(SHAPES.index(rows[i]["category"]) + 1) % 3]
        elif kind == "price":
            rows[i]["price"] = float(rows[i]["price"]) + 1 + n
    return rows


def brute_force_reach(index: VectorIndex, previous_state: Path, k: int) -> tuple[set[str], set[str]]:
    """(the products whose lists an edit can reach, by brute force over every vector; those gone)."""
    old = {r["id"]: r for r in map(json.loads, previous_state.read_text().splitlines()[1:-1])}
    ids = [p for p, _ in index.browse(Filters(), 1000)[0]]
    payloads = index.payloads(ids)
    vectors = index.vectors(ids)
    now_fp = {p: f"{payloads[p].get('model_version', '')}:{payloads[p]['vectors_hash']}" for p in ids}
    moved = {
        p
        for p in ids
        if p not in old or old[p]["fp"] != now_fp[p] or old[p]["key"] != [payloads[p]["category"]]
    }
    gone = old.keys() - set(ids)
    reach = set(moved)
    for p, record in old.items():
        if p in gone:
            continue
        if any(n[0] in moved | gone for n in record["n"]):
            reach.add(p)
            continue
        radius = np.inf if record["r"] is None else record["r"]  # how far its kept neighbours reach
        for c in moved:
            if payloads[c]["category"] == payloads[p]["category"]:
                between = np.linalg.norm(vectors[p][:, None, :] - vectors[c][None, :, :], axis=2).min()
                if between <= radius + 1e-5:
                    reach.add(p)
    return reach, gone


@hypothesis_settings(
    max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(edits, min_size=1, max_size=3))
def test_previous_feed_and_delta_make_the_full_feed_now(
    synced: Settings, tmp_path_factory: pytest.TempPathFactory, steps: list[list[Edit]]
) -> None:
    root = tmp_path_factory.mktemp("delta")
    settings = small_settings(root, artefact=synced.artefact)
    copy_tree_sparse(synced.qdrant.path, settings.qdrant.path)
    shutil.copytree(synced.qdrant.path.parent / "images", root / "images")
    rows = catalogue_rows(PRODUCTS, root)
    rules = FeedRules(k=3, same=("category",), exact=True)
    feed = root / "feed-0.jsonl"
    with open_index(settings.qdrant) as index:
        make_feed(index, rules, feed, "jsonl")
    current: Feed = read_jsonl(feed)
    for step, chosen in enumerate(steps, 1):
        rows = edited(rows, chosen, root, step)
        run_sync(write_csv(root / "catalogue.csv", rows), settings, max_delete=1.0)
        delta, full = root / f"delta-{step}.jsonl", root / f"full-{step}.jsonl"
        with open_index(settings.qdrant) as index:
            reach, gone = brute_force_reach(index, state_path(feed), rules.k)
            summary = make_feed(index, rules, delta, "jsonl", since=feed)
            make_feed(index, rules, full, "jsonl")
        changes = read_jsonl(delta)
        current = applied(current, changes)
        assert close(current, read_jsonl(full)), (step, chosen)
        assert summary["queried"] <= len(reach), (summary, sorted(reach))  # only what an edit can reach
        assert {p for p, v in changes.items() if v == "deleted"} == gone
        assert summary["deleted"] == len(gone) and summary["lists_written"] == len(changes) - len(gone)
        if all(kind == "price" for kind, _ in chosen):
            assert summary["queried"] == 0 and changes == {}
        feed = delta


KILLED_BETWEEN_RENAMES = """
import os, runpy, signal, sys
rename = os.replace
def replace(source, target, *args, **kwargs):  # the real rename, then SIGKILL once the state is in place
    rename(source, target, *args, **kwargs)
    if str(target).endswith(".state"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = ["visrec", *sys.argv[1:]]
runpy.run_module("visrec", run_name="__main__")
"""


@pytest.mark.parametrize("since", [True, False])
def test_a_feed_killed_between_its_two_renames_leaves_one_a_delta_reads(tmp_path: Path, since: bool) -> None:
    """A feed (or a delta over its own `--since`) written to the path of the previous feed, killed
    after its state replaced the previous one and before the feed did: the next delta on that path reads
    the previous feed with the state kept beside it, and is right (an outside review: it refused)."""
    settings = small_settings(tmp_path)
    rng = np.random.default_rng(1)
    with open_index(settings.qdrant) as index:
        index.create(8)
        points = [
            IndexPoint(
                f"r{i}",
                rng.standard_normal(8).astype(np.float32),
                {"product_id": f"r{i}", "vectors_hash": f"h{i}"},
            )
            for i in range(200)
        ]
        index.upsert(points)
        make_feed(index, FeedRules(k=3), tmp_path / "full.jsonl", "jsonl")
        index.upsert([IndexPoint("r1", np.ones(8, np.float32), {"product_id": "r1", "vectors_hash": "new"})])
    feed = tmp_path / "feed.jsonl"
    shutil.copy(tmp_path / "full.jsonl", feed)
    shutil.copy(state_path(tmp_path / "full.jsonl"), state_path(feed))
    args = ["neighbours", "-k", "3", "--out", str(feed), *(["--since", str(feed)] if since else [])]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BETWEEN_RENAMES, *args], env=settings_env(settings), capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL
    assert feed.read_bytes() == (tmp_path / "full.jsonl").read_bytes()  # the old feed, a new state
    delta = run_visrec(
        settings, "neighbours", "-k", "3", "--since", str(feed), "--out", str(tmp_path / "delta.jsonl")
    )
    assert delta.returncode == 0, delta.stderr
    with open_index(settings.qdrant) as index:
        make_feed(index, FeedRules(k=3), tmp_path / "now.jsonl", "jsonl")
    _assert_delta_makes_now(tmp_path)
