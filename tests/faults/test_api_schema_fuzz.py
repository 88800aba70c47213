"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (Schemathesis + Hypothesis).

A real `visrec serve` on loopback (real uvicorn, the guard, the tiny real model, an embedded store of 27
products) with an API key; every operation of the schema it publishes gets seeded valid (positive) and
invalid (negative) requests. Complements test_api_fuzz.py, whose hand-written fuzzer knows the
routes' tricky values; this one follows the schema, so a route or parameter added later is fuzzed too,
and it checks that the answers are what the schema says.

Bounded: VISREC_FAULTS_SCHEMA_EXAMPLES examples per operation and mode (CI default 25, ~250
requests in all; the figures use 100), seeded by VISREC_FAULTS_SEED; failures are collected, not shrunk.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.failures import AcceptedNegativeData, Failure, FailureGroup
from schemathesis.core.result import Ok
from schemathesis.openapi.checks import IgnoredAuth
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.faults.helpers import SEED, figure
from tests.faults.served import Served, leaks, serve, synced_store
from visrec.artefact import Manifest

EXAMPLES = int(os.environ.get("VISREC_FAULTS_SCHEMA_EXAMPLES", "25"))
KEY = "fuzz-key"
# Every check Schemathesis has (`checks` unset: all built-ins), among them: every status documented for
# its route, content types, headers (Retry-After on a 503, Allow on a 405), bodies matching the
# documented models (errors included), invalid input answered 4xx and valid input accepted, methods a
# route does not take answered 405, and no 5xx (VISREC_FAULTS_SCHEMA_CHECKS=listed: the five of before).
CHECKS: dict[str, Any] = (
    {
        "checks": [
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ]
    }
    if os.environ.get("VISREC_FAULTS_SCHEMA_CHECKS") == "listed"
    else {}
)
BUSY = ("busy", "unavailable", "retry")  # what a deliberate 503 says
UPLOAD = "/search/image"
HEAD_LIMIT = 16 * 1024 - 512  # h11's max_incomplete_event_size, less what the count here leaves out


WRITE_KEY = "fuzz-write-key"


@pytest.fixture(scope="module", params=["read key", "write key"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, artefact: tuple[Path, Manifest]
) -> Iterator[Served]:
    """The service with both keys; the requests carry one of them (the write key also reads, and its
    requests reach the write routes' bodies)."""
    root = tmp_path_factory.mktemp("schema-fuzz")
    settings = synced_store(root, artefact[0])
    env = {"VISREC_API__WRITE_KEY": WRITE_KEY}
    with serve(settings, root / "serve.log", key=KEY, env=env, max_upload_bytes=200_000) as server:
        yield server if request.param == "read key" else dataclasses.replace(server, key=WRITE_KEY)


def test_every_operation_answers_as_its_schema_says(served: Served) -> None:
    """Fault: Schemathesis-generated requests for every operation in /openapi.json, valid ones and
    invalid ones (wrong types, out-of-range numbers, missing or extra fields, odd strings), sent with the
    API key to a real server. Checked: no 5xx but a deliberate 503 (busy or unavailable, with
    Retry-After); every status is documented for its route and the body matches the documented schema
    (error bodies included: {detail, error?, request_id}); invalid input is rejected with a 4xx (but for
    "invalid" query values that were valid, or gone, once written into the URL: counted, not failed);
    no body shows a server path or a traceback; /healthz and /readyz answer 200 afterwards."""
    raw = requests.get(f"{served.url}/openapi.json", headers=served.headers, timeout=10)
    assert raw.status_code == 200, raw.text
    spec = raw.json()
    schema = schemathesis.openapi.from_dict(spec)
    lost: Counter[str] = Counter()  # negative query values that were valid, or gone, once on the wire
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    sent = 0
    started = time.monotonic()
    with requests.Session() as session:
        session.headers.update(served.headers)
        operations = []
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result  # the schema's every operation is one Schemathesis reads
            operations.append(result.ok())
        assert len(operations) >= 9, [op.label for op in operations]
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                strategy = operation.as_strategy(generation_mode=mode)
                if "{product_id}" in operation.path:  # half the time an indexed product, not a 404
                    known = operation.as_strategy(generation_mode=mode, path_parameters={"product_id": "p4"})
                    strategy = st.one_of(strategy, known)

                def one(case: Any, operation: Any = operation, mode: GenerationMode = mode) -> None:
                    nonlocal sent
                    response = case.call(base_url=served.url, session=session, timeout=30)
                    sent += 1
                    statuses[response.status_code] += 1
                    problems = _problems(case, response, served, spec, lost)
                    if problems:
                        where = f"{mode.value} {case.method} {response.request.url}"[:300]
                        failures.append(
                            f"{where} -> {response.status_code}: {problems}: "
                            + response.content[:300].decode(errors="replace")
                        )

                try:
                    _run(one, strategy)
                except Unsatisfiable:  # nothing invalid to send: the operation takes no input
                    assert mode is GenerationMode.NEGATIVE, operation.label
    seconds = time.monotonic() - started
    figure(
        "schema_fuzz",
        {
            "operations": len(operations),
            "examples_per_operation_and_mode": EXAMPLES,
            "requests": sent,
            "seconds": round(seconds, 1),
            "seed": SEED,
            "statuses": dict(sorted(statuses.items())),
            "negative_query_not_negative_on_the_wire": sum(lost.values()),
            "schemathesis": schemathesis.__version__,
        },
    )
    assert not failures, "\n".join(failures[:15])
    assert sent >= len(operations) * EXAMPLES // 2
    assert requests.get(f"{served.url}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{served.url}/readyz", timeout=5).status_code == 200


def _run(one: Callable[..., None], strategy: st.SearchStrategy[Any]) -> None:
    """`one` on EXAMPLES cases drawn from `strategy`, seeded; no shrinking (failures are collected)."""

    @seed(SEED)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        one(case)

    run()


def _over_the_head_limit(request: requests.PreparedRequest) -> bool:
    """Whether a request's line and headers pass what the HTTP server reads of them (h11: 16 KiB): a long
    `exclude` list in the URL (the route's POST form takes a body)."""
    head = len(f"{request.method} {request.url} HTTP/1.1\r\n".encode()) + sum(
        len(f"{name}: \r\n".encode()) + len(value if isinstance(value, bytes) else value.encode())
        for name, value in request.headers.items()
    )
    return head > HEAD_LIMIT


def _problems(
    case: Any,
    response: requests.Response,
    served: Served,
    spec: dict[str, Any],
    lost: Counter[str],
) -> list[str]:
    """What is wrong with one answer: failed Schemathesis checks, an undeliberate 5xx, leaks."""
    if _over_the_head_limit(response.request) and response.status_code == 400:
        return []  # refused by the HTTP server before visrec sees it, as docs/http-api.md says
    problems: list[str] = []
    if response.status_code >= 500:
        detail = response.text.lower()
        deliberate = response.status_code == 503 and response.headers.get("Retry-After")
        if not (deliberate and any(word in detail for word in BUSY)):
            problems.append(f"server error {response.status_code}")
    try:
        excluded = []
        if case.operation.path == UPLOAD and "checks" not in CHECKS:
            # "A photo" is more than a schema can say of a file: an upload that does not decode is
            # refused (422, ImageError), the one refusal of schema-valid input, checked here instead.
            excluded = [positive_data_acceptance]
            if (
                response.status_code == 422
                and _positive(case)
                and _error(response) not in ("ImageError", "NoMatch")
            ):
                problems.append("a schema-valid upload refused for something else than its image")
        if case.method == "PUT" and "checks" not in CHECKS:
            # Whether a photo URL may be fetched (a public host, a port it allows) and gives a photo is
            # more than a schema can say: such a row is refused (422) with its photo named, checked here.
            excluded = [positive_data_acceptance]
            said = response.text.lower()
            if (
                response.status_code == 422
                and _positive(case)
                and not ("photo" in said or "image url" in said)
            ):
                problems.append("a schema-valid row refused for something else than its photo")
        lossy = case.operation.path != UPLOAD and _positive(case) and _beyond_64_bits(case.body)
        if response.status_code == 422 and lossy and "checks" not in CHECKS:
            # The schema's integer bounds are written as doubles (±2**63), which a validator compares
            # lossily: 2**63 + 191 passes it, and the server's exact rule refuses it, saying so.
            excluded = [positive_data_acceptance]
            if "beyond 64 bits" not in response.text:
                problems.append("a body with a number beyond 64 bits refused for something else")
        if response.status_code == 422 and _error(response) == "NoMatch" and "checks" not in CHECKS:
            # Whether some product has a value is more than a schema can say: a filter no product meets
            # (a category, a `where` field or value) is refused, naming what there is.
            excluded = [positive_data_acceptance]
        case.validate_response(response, headers=dict(served.headers), excluded_checks=excluded, **CHECKS)
    except (FailureGroup, Failure) as caught:
        for failure in caught.exceptions if isinstance(caught, FailureGroup) else [caught]:
            if isinstance(failure, AcceptedNegativeData) and _not_negative_on_the_wire(case, response, spec):
                lost[case.operation.label] += 1
            elif isinstance(failure, IgnoredAuth) and "got `429 Too Many Requests`" in failure.message:
                # Schemathesis replays the request without the key and wants 401/403: after a few, the
                # guard throttles the address's failed keys (429 with Retry-After), a refusal too.
                continue
            else:
                problems.append(_one_line(failure))
    if found := leaks(response.content, served):
        problems.append(f"leaks {found}")
    return problems


def _beyond_64_bits(body: Any) -> bool:
    """Whether a JSON body holds a whole number outside 64 bits (at any depth)."""
    if isinstance(body, bool):
        return False
    if isinstance(body, int):
        return not -(2**63) <= body < 2**63
    if isinstance(body, dict):
        return any(_beyond_64_bits(v) for v in body.values())
    if isinstance(body, list):
        return any(_beyond_64_bits(v) for v in body)
    return False


def _error(response: requests.Response) -> str | None:
    """visrec's kind of error in an error body, if any."""
    try:
        kind = response.json().get("error")
    except (ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def _positive(case: Any) -> bool:
    generation = getattr(getattr(case, "meta", None), "generation", None)
    return bool(generation is not None and generation.mode.is_positive)


def _one_line(failure: BaseException) -> str:
    return f"{type(failure).__name__}: " + " | ".join(str(failure).split("\n")[:6])


def _query_parameters(spec: dict[str, Any], case: Any) -> dict[str, dict[str, Any]]:
    operation = spec["paths"][case.operation.path][case.method.lower()]
    return {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "query"}


def _not_negative_on_the_wire(case: Any, response: requests.Response, spec: dict[str, Any]) -> bool:
    """Whether a "negative" case was valid as sent. Its mutations are of query parameters only, and each
    either did not reach the URL (an empty list, a null: nothing to send) or arrived as a valid value
    (`false` for a string, a one-item list for a number: on the wire both are strings). Schemathesis
    allows for some of these, not for every mix of two mutations."""
    mutations = getattr(getattr(getattr(case.meta, "phase", None), "data", None), "mutations", ())
    if not mutations:
        return False
    declared = _query_parameters(spec, case)
    sent = parse_qs(urlsplit(response.request.url or "").query, keep_blank_values=True)
    for mutation in mutations:
        if mutation.parameter_location.name != "QUERY" or mutation.parameter not in declared:
            return False
        parameter = declared[mutation.parameter]
        values = sent.get(mutation.parameter)
        if values is None:
            if parameter.get("required"):
                return False
        elif not _valid_query_values(values, parameter.get("schema", {})):
            return False
    return True


def _valid_query_values(values: list[str], schema: dict[str, Any]) -> bool:
    """Whether the strings sent for one query parameter are valid for its schema, read as FastAPI would:
    an integer or a finite number where the text is one, else the text itself."""
    if schema.get("type") == "array":
        return all(_valid_query_values([value], schema.get("items", {})) for value in values)
    if len(values) != 1:
        return False
    validator = jsonschema_rs.validator_for(schema, validate_formats=True)
    return any(validator.is_valid(candidate) for candidate in _readings(values[0]))


def _readings(text: str) -> list[Any]:
    readings: list[Any] = [text]
    if re.fullmatch(r"[+-]?\d+", text.strip()):
        readings.append(int(text))
    else:
        try:
            number = float(text)
        except ValueError:
            return readings
        if math.isfinite(number):
            readings.append(number)
    return readings
