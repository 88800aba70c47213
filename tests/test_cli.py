"""The CLI through typer's CliRunner: the whole line of data, and user errors as one clean line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.helpers import MakeCatalogue, write_shop
from visrec.cli import app
from visrec.config import Settings

runner = CliRunner()


def test_train_sync_similar_status_report(
    make_catalogue: MakeCatalogue, env: Settings, tmp_path: Path
) -> None:
    catalogue = make_catalogue(18)
    model = tmp_path / "trained"
    result = runner.invoke(
        app,
        [
            "train",
            str(catalogue),
            "--out",
            str(model),
            "--backbone",
            "resnet18",
            "--weights",
            "random",
            "--image-size",
            "32",
            "--epochs-frozen",
            "2",
            "--epochs-finetune",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)
    assert trained["classes"] == ["circle", "square", "triangle"] and "top3" in trained["metrics"]

    result = runner.invoke(app, ["sync", str(catalogue), "--model", str(model), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == 18

    result = runner.invoke(
        app,
        ["similar", "p0", "-k", "4", "--colour", "red", "--colour", "blue", "--price-max", "25", "--json"],
    )
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 4 and all(h["payload"]["colour"] in {"red", "blue"} for h in hits)
    assert all(h["payload"]["price"] <= 25 and h["product_id"] != "p0" for h in hits)

    result = runner.invoke(
        app,
        [
            "similar",
            "--image",
            str(tmp_path / "images" / "p3.png"),
            "--model",
            str(model),
            "-k",
            "2",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["product_id"] == "p3"

    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["points"] == 18

    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", "--out", str(out), "--queries", "3", "-k", "4", "--same-category"])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert page.count('class="row"') == 3 and page.count("data:image/png;base64") == 15
    assert "report" in result.stdout

    # A page that cannot be written there: one line, exit 2, before the work; nothing else written.
    (tmp_path / "a-file").write_text("x")
    for where, says in [
        (tmp_path, "is a folder: name the page's file"),
        (tmp_path / "a-file" / "r.html", "is a file, not a folder"),
    ]:
        for command in (["report", "--queries", "1"], ["duplicates"]):
            result = runner.invoke(app, [*command, "--out", str(where)])
            assert result.exit_code == 2 and says in result.stderr, result.output
            if where == tmp_path:  # the example names the command's own page
                assert f"{command[0]}.html" in result.stderr.replace("\n", ""), result.stderr
            assert "unexpected" not in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["report", "--queries", "1", "--out", str(tmp_path / "new" / "r.html")])
    assert result.exit_code == 0 and (tmp_path / "new" / "r.html").is_file(), result.output
    # A page replaces a page; never another file (a mistyped --out naming the catalogue: outside trial).
    result = runner.invoke(app, ["report", "--queries", "1", "--out", str(tmp_path / "new" / "r.html")])
    assert result.exit_code == 0, result.output
    before = catalogue.read_bytes()
    for command in (["report", "--queries", "1"], ["duplicates"], ["neighbours"]):
        result = runner.invoke(app, [*command, "--out", str(catalogue)])
        assert result.exit_code == 2 and "is not a file visrec wrote" in result.stderr, result.output
    feed = tmp_path / "feed.jsonl"
    for _ in range(2):  # a feed replaces the feed made before
        assert runner.invoke(app, ["neighbours", "--out", str(feed)]).exit_code == 0
    assert catalogue.read_bytes() == before


def test_train_with_normalized_softmax(make_catalogue: MakeCatalogue, env: Settings, tmp_path: Path) -> None:
    quick = ["--backbone", "resnet18", "--weights", "random", "--image-size", "32", "--epochs-frozen", "2"]
    args = ["train", str(make_catalogue(18)), "--out", str(tmp_path / "m"), *quick, "--epochs-finetune", "0"]
    result = runner.invoke(app, [*args, "--loss", "normalized-softmax", "--temperature", "0.1", "--json"])
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout)  # the time estimate goes to stderr, before the bars
    assert result.stderr.startswith("estimated training time: about ") and "an estimate" in result.stderr
    assert trained["loss"] == "normalized-softmax" and trained["training"]["temperature"] == 0.1
    assert trained["embedding_dim"] == 1000

    result = runner.invoke(app, [*args, "--loss", "arcface"])
    assert (
        result.exit_code == 2 and "invalid setting: --loss: " in result.stderr
    )  # the flag, not its variable
    result = runner.invoke(app, [*args, "--temperature", "0.1"])  # without --loss: the paper's softmax
    assert result.exit_code == 2 and "temperature applies to loss 'normalized-softmax' only" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["similar", "nope"], "collection", 4),  # nothing synced yet
        (["similar"], "either a PRODUCT_ID or --image", 2),
        (["similar", "p1", "--where", "brand"], "FIELD=VALUE", 2),
        (["similar", "p1", "--price-max", "nan"], "price_max: Input should be a finite number", 2),
        (["similar", "--image", "x.png", "--model", "no-such-model"], "no-such-model", 3),
        (["sync", "missing.csv"], "catalogue not found", 2),
        (["sync", "missing.csv", "--shard", "3/3"], "i/N", 2),
        (["train", "missing.csv"], "catalogue not found", 2),
    ],
)
def test_user_errors_are_one_line_and_an_exit_code(
    env: Settings, args: list[str], message: str, code: int
) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_flags_merge_over_environment_and_bad_settings_are_one_line(
    env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visrec.cli_common import _settings

    monkeypatch.setenv("VISREC_TRAIN__EPOCHS_FROZEN", "7")
    merged = _settings(**{"train.image_size": 48, "train.backbone": None})
    assert (merged.train.image_size, merged.train.epochs_frozen, merged.train.backbone) == (48, 7, "resnet50")
    monkeypatch.setenv("VISREC_EMBED__BATCH_SIZE", "0")
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 2 and "invalid setting: VISREC_EMBED__BATCH_SIZE" in result.stderr
    assert "Traceback" not in result.output
    # A bad value is named where it was given: the flag, or the variable.
    result = runner.invoke(app, ["train", "c.csv", "--image-size", "0", "--out", "m"])
    assert result.exit_code == 2 and "--image-size: Input should be greater than" in result.stderr
    assert "VISREC_EMBED__BATCH_SIZE" in result.stderr and "VISREC_TRAIN__IMAGE_SIZE" not in result.stderr


def test_sync_without_a_model_says_to_train(
    make_catalogue: MakeCatalogue,
    env: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("VISREC_ARTEFACT", str(tmp_path / "no-model"))
    result = runner.invoke(app, ["sync", str(make_catalogue(3))])
    assert result.exit_code == 3 and "run `visrec train` first" in result.stderr


def test_sync_decoding_jpegs_on_the_device(
    make_catalogue: MakeCatalogue, env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The setting reaches the embedder; on this CPU-only machine the "device" is the CPU.
    catalogue = make_catalogue(6)
    for png in (catalogue.parent / "images").glob("*.png"):
        Image.open(png).save(png.with_suffix(".jpg"), quality=95)
    catalogue.write_text(catalogue.read_text().replace(".png", ".jpg"))
    monkeypatch.setenv("VISREC_EMBED__DECODE_ON_DEVICE", "true")
    result = runner.invoke(app, ["sync", str(catalogue), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == 6
    result = runner.invoke(app, ["similar", "p0", "-k", "2", "--colour", "red", "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert [hit["product_id"] for hit in hits] == ["p1", "p2"]
    assert {hit["payload"]["colour_extracted"] for hit in hits} == {"red"}  # workers still saw the photos


def test_a_truncated_export_is_refused_in_one_line_and_allowed_with_max_delete(
    make_catalogue: MakeCatalogue, env: Settings, tmp_path: Path
) -> None:
    catalogue = make_catalogue(10)
    assert runner.invoke(app, ["sync", str(catalogue), "--json"]).exit_code == 0
    truncated = tmp_path / "truncated.csv"
    truncated.write_text("".join(catalogue.read_text().splitlines(keepends=True)[:4]))  # 3 of 10 rows
    refused = runner.invoke(app, ["sync", str(truncated), "--json"])
    assert refused.exit_code == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "would delete 7 of the 10" in refused.stderr
    allowed = runner.invoke(app, ["sync", str(truncated), "--json", "--max-delete", "1"])
    assert allowed.exit_code == 0 and json.loads(allowed.stdout)["deleted"] == 7


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        (
            "VISREC_INGEST__IMAGE_ROOTS",
            "/data/images",
            "VISREC_INGEST__IMAGE_ROOTS='/data/images' is not JSON (a list",
        ),
        (
            "VISREC_API__PUBLIC_FIELDS",
            '"price"',
            "VISREC_API__PUBLIC_FIELDS: Input should be a valid list (a list",
        ),
        ("VISREC_QDRANT__HNSW_M", "many", "VISREC_QDRANT__HNSW_M: Input should be a valid integer"),
    ],
)
def test_a_malformed_setting_names_its_variable_and_form(
    env: Settings, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, said: str
) -> None:
    monkeypatch.setenv(variable, value)
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2 and said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_status_of_an_empty_store_says_nothing_is_indexed(env: Settings) -> None:
    """A report, exit 0, but it says so: a misspelt store or collection must not look like a healthy one."""
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["points"] == 0 and data["versions"] == []
    assert "nothing is indexed in" in data["problem"] and "visrec sync" in data["problem"]


def test_filter_mistakes_are_one_line_naming_what_there_is(env: Settings, tmp_path: Path) -> None:
    """On a shop's catalogue: a condition no product meets exits 2 naming the values or fields there are
    (the engine's facet counts); conditions that only together match nothing answer [] (exit 0) and say
    so on stderr; `--where` takes a range on a number."""
    assert runner.invoke(app, ["sync", str(write_shop(tmp_path))]).exit_code == 0
    for args, message in [
        (
            ["--category", "Shirt"],
            "no product has category 'Shirt' (did you mean 'shirt'?); category has jeans",
        ),
        (
            ["--colour", "rde"],
            "no product has colour 'rde' (did you mean 'red'?); colour has green (4), navy",
        ),
        (
            ["--where", "brnd=acme"],
            "no field 'brnd' is known (did you mean 'brand'?); fields: brand, category",
        ),
        (["--where", "size=40..42"], "a range matches numbers only, and size holds text; size has 38 (4)"),
    ]:
        result = runner.invoke(app, ["similar", "s1", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.output
    together = runner.invoke(app, ["similar", "s1", "--category", "shirt", "--colour", "navy", "--json"])
    assert together.exit_code == 0 and json.loads(together.stdout) == []
    assert "no product meets them all together" in together.stderr
    ranged = runner.invoke(
        app, ["similar", "s1", "--where", "price=20..30", "--where", "in_stock=true", "--json"]
    )
    assert ranged.exit_code == 0, ranged.output
    assert {h["payload"]["price"] for h in json.loads(ranged.stdout)} == {20.0, 30.0}  # s2, s4; s3: none


def test_sync_shows_its_first_failures_and_the_delimiter(
    make_catalogue: MakeCatalogue, env: Settings
) -> None:
    """A semicolon catalogue with decimal commas syncs fully; the rows it cannot read are shown with their
    line and reason under the summary (not only counted), and where the whole report is."""
    catalogue = make_catalogue(8)
    lines = catalogue.read_text().splitlines()
    rows = [line.replace(",", ";") for line in lines]  # the drawn rows hold no commas of their own
    rows = [row.replace(".5", ",5") for row in rows]  # decimal commas: 10.5 → 10,5
    rows[3] = rows[3].replace("12,5", "12 Euro")  # line 4: p2's price cannot be read
    rows.append("p9;images/p9.png;circle;red;9;missing photo")  # line 10: a photo that is not there
    catalogue.write_text("\n".join(rows) + "\n")
    result = runner.invoke(app, ["sync", str(catalogue)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # rich wraps long lines
    assert "delimiter │ semicolon" in text and "invalid_rows │ 1" in text and "failed │ 1" in text
    assert "failures (the first 2; all of them are in" in text
    assert "line 4 'p2': price: '12 Euro' is not a price" in text
    assert "line 10 'p9':" in text and "file not found" in text
    result = runner.invoke(app, ["similar", "p0", "--json"])
    prices = {h["product_id"]: h["payload"]["price"] for h in json.loads(result.stdout)}
    assert prices["p1"] == 11.5  # 11,5 read as 11.5


def test_an_error_message_is_printed_as_it_is(env: Settings, tmp_path: Path) -> None:
    """Brackets in a message (a path, `pip install 'visrec[parquet]'`) are text, not terminal markup."""
    missing = tmp_path / "[red]shop[/red]" / "cat[1].csv"
    result = runner.invoke(app, ["sync", str(missing)])
    assert result.exit_code == 2, result.output
    assert f"catalogue not found: {missing}" in result.stderr.replace("\n", ""), result.stderr


def test_a_file_where_a_folder_is_wanted_is_said_before_the_work(
    make_catalogue: MakeCatalogue, env: Settings, tmp_path: Path
) -> None:
    """`train --out FILE` and a store path that is a file: exit 2, one line, before training starts
    (outside trial: exit 1, "unexpected FileExistsError", after the training)."""
    catalogue = make_catalogue(6)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile, afile / "model"):
        result = runner.invoke(app, ["train", str(catalogue), "--out", str(out), "--weights", "random"])
        assert result.exit_code == 2, result.output
        assert "is a file, not a folder" in result.stderr and "unexpected" not in result.output
        assert "estimate" not in result.stderr.lower()  # refused before the time estimate's probe
    result = runner.invoke(app, ["status"], env={"VISREC_QDRANT__PATH": str(afile)})
    assert result.exit_code == 2 and "VISREC_QDRANT__PATH" in result.stderr, result.output


def test_the_shops_rules_on_similar_and_neighbours(env: Settings, tmp_path: Path) -> None:
    """--exclude, --boost and --decay, shared by `similar` and `neighbours`: mistakes exit 2 in one line
    naming the option; a delta (--since) keeps --exclude and refuses --boost."""
    assert runner.invoke(app, ["sync", str(write_shop(tmp_path))]).exit_code == 0
    args = ["similar", "s1", "-k", "6", "--exclude", "s2", "--exclude", "s4", "--boost", "in_stock=100"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 6 and not {h["product_id"] for h in hits} & {"s2", "s4"}
    stock = [h["payload"]["in_stock"] for h in hits]
    assert stock == sorted(stock, key=lambda s: s != "true") and all("score" in h for h in hits)
    for bad, message in [
        (["--boost", "in_stock=nan"], "boost: takes FIELD=WEIGHT"),
        (["--boost", "brnd=1"], "cannot boost by brnd: no field 'brnd' is known (did you mean 'brand'?)"),
        (["--decay", "size=soon"], "decay: takes FIELD=SCALE"),
        (["--decay", "price=30d"], "cannot decay by price: it holds numbers"),
    ]:
        refused = runner.invoke(app, ["similar", "s1", *bad])
        assert refused.exit_code == 2 and message in refused.stderr, refused.output
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.output
    feed = tmp_path / "feed.jsonl"
    made = runner.invoke(app, ["neighbours", "--out", str(feed), "-k", "3", "--exclude", "s2", "--json"])
    assert made.exit_code == 0, made.output
    lists = [json.loads(line) for line in feed.read_text().splitlines()]
    assert lists and all("s2" not in json.dumps(row["neighbours"]) for row in lists)
    delta = tmp_path / "delta.jsonl"
    kept = ["neighbours", "--out", str(delta), "--since", str(feed), "-k", "3", "--exclude", "s2"]
    assert runner.invoke(app, kept).exit_code == 0
    boosted = runner.invoke(app, [*kept, "--boost", "in_stock=1"])
    assert boosted.exit_code == 2 and "--boost" in boosted.stderr
    full = runner.invoke(app, ["neighbours", "--out", str(delta), "-k", "3", "--boost", "in_stock=1"])
    assert full.exit_code == 0, full.output
