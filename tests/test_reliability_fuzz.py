"""schemathesis against the running service's own OpenAPI specs: BentoML's ``/docs.json`` (inference)
and the management ``/v1/openapi.json``, with tenant and admin tokens. The only check: never a 5xx.

The normal suite generates a few hundred cases; with LORAPLEX_STRESS=1 (benchmarks/stress.py) over
5,000.
"""

from __future__ import annotations

import pytest

from tests.reliability_support import is_ready, record, run_schemathesis, stress_enabled
from tests.service_support import ADMIN_TOKEN, TENANT_TOKENS, seeded_store, serve_ready, service_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# (spec, token, examples per operation: normal, stress)
RUNS = [
    ("/docs.json", TENANT_TOKENS["acme"], 12, 500),
    ("/v1/openapi.json", ADMIN_TOKEN, 6, 160),
    ("/v1/openapi.json", TENANT_TOKENS["globex"], 2, 40),
    ("/docs.json", ADMIN_TOKEN, 2, 40),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir):
    tmp = tmp_path_factory.mktemp("rel-fuzz")
    seeded_store(tmp / "store", tiny_bert_dir, tmp)
    env = service_env(str(tmp / "store"), tmp, LORAPLEX_MAX_BODY_BYTES="65536", LORAPLEX_MAX_INPUTS="16")
    srv = serve_ready("serving.service:LoraplexService", env, tmp)
    yield srv, tmp
    srv.stop()


@pytest.mark.parametrize(
    "stress", [False, pytest.param(True, marks=[pytest.mark.stress, pytest.mark.timeout(3600)])]
)
def test_schemathesis_finds_no_5xx(server, stress):
    if stress and not stress_enabled():
        pytest.skip("set LORAPLEX_STRESS=1 (benchmarks/stress.py) for the 5,000-case run")
    srv, tmp = server
    total, failures = 0, []
    for i, (spec, token, normal, heavy) in enumerate(RUNS):
        run = run_schemathesis(srv.url, spec, token, heavy if stress else normal, tmp / f"st-{stress}-{i}")
        total += run.generated
        failures += [f"{spec}: {f}" for f in run.failures]
        assert run.exit_code == 0 or run.failures, run.output
        assert srv.proc.poll() is None, srv.log_tail()
    assert is_ready(srv.url)
    record("fuzz_cases" + ("_stress" if stress else ""), total, "cases", "0 5xx")
    assert not failures, "\n".join(str(f)[:500] for f in failures)
    assert total >= (5000 if stress else 300), total
