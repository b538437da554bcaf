"""Issue 11, safe operations: a refused request changes nothing, aliased versions are not deleted by
accident, version numbers are never reused, and the CLI says what it did (store and CLI level; the same
rules over a real ``bentoml serve`` are in test_e2e_safe_ops.py)."""

from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner

from adapters_store import describe_base, open_store
from adapters_store.errors import Conflict, InvalidName, LoraplexError, NotFound
from adapters_store.names import AdapterRef
from adapters_store.registry import DEFAULT_STORE_URL
from serving.engine.resolver import parse_tenant_ref
from serving.gateway import check_path
from serving.schemas import AliasRequest
from tests.helpers.bundles import head_bundle, save_peft_lora
from training.cli import main

BAD_ALIASES = ["Bad Alias", "../x", "CON", "7", "latest"]


@pytest.fixture
def base(any_store, tiny_bert_dir):
    return any_store.register_base(describe_base("tiny-bert", tiny_bert_dir))


def _state(store, tenant="acme", name="head"):
    return store.version_numbers(tenant, name), store.aliases(tenant, name)


# -- store ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias", BAD_ALIASES)
def test_put_with_a_bad_or_reserved_alias_stores_nothing(any_store, base, alias):
    any_store.put(head_bundle(base, seed=1), ["production"])
    before = _state(any_store)
    with pytest.raises((InvalidName, Conflict)):
        any_store.put(head_bundle(base, seed=2), [alias])
    with pytest.raises((InvalidName, Conflict)):
        any_store.put(head_bundle(base, seed=3), ["production", alias])  # the good one must not move
    assert _state(any_store) == before == ([1], {"production": 1, "latest": 1})


def test_deleting_an_aliased_version_is_refused_unless_forced(any_store, base):
    """The issue's story: roll production back v2 -> v1, delete v1: traffic fell back to v2."""
    for seed in (1, 2):
        any_store.put(head_bundle(base, seed=seed), ["production", "staging"] if seed == 1 else [])
    with pytest.raises(Conflict, match="production, staging"):
        any_store.delete_version("acme", "head", 1)
    assert _state(any_store) == ([1, 2], {"production": 1, "staging": 1, "latest": 2})
    assert any_store.delete_version("acme", "head", 1, force=True) == {"production": 1, "staging": 1}
    assert _state(any_store) == ([2], {"latest": 2})
    assert any_store.delete_version("acme", "head", 2) == {}  # only 'latest' pointed at it


def test_version_numbers_continue_after_deleting_the_whole_adapter(any_store, base):
    for seed in (1, 2, 3):
        any_store.put(head_bundle(base, seed=seed))
    any_store.delete_version("acme", "head", 3)
    assert any_store.delete_adapter("acme", "head") == 2
    assert any_store.list_adapters("acme") == []  # the high-water mark is not an adapter
    again = any_store.put(head_bundle(base, seed=4))
    assert again.version == 4
    with pytest.raises(NotFound):
        any_store.resolve("acme/head@1")
    any_store.delete_adapter("acme", "head")
    assert any_store.put(head_bundle(base, seed=5)).version == 5


def test_empty_selector_is_refused():
    with pytest.raises(InvalidName, match="ends with '@'"):
        AdapterRef.parse("acme/intent@")
    with pytest.raises(InvalidName):
        parse_tenant_ref("acme", "intent@")
    assert AdapterRef.parse("acme/intent").selector == "latest"  # no '@' at all is still fine
    assert parse_tenant_ref("acme", "intent") == (AdapterRef("acme", "intent"), False)


@pytest.mark.parametrize("body", ['{"version": true}', '{"version": 1.0}', '{"version": "1"}'])
def test_alias_version_must_be_a_json_integer(body):
    with pytest.raises(ValueError):
        AliasRequest.model_validate_json(body)
    assert AliasRequest.model_validate_json('{"version": 2}').version == 2


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"/v1/admin/tenants/acme/adapters/v/versions/..%2F", 400),
        (b"/v1/admin/tenants/acme/adapters/v/versions/%2e%2e%2f", 400),
        (b"/v1/admin/tenants/acme%2Fadapters%2Fv", 400),
        (b"/v1/adapters/x%5c..", 400),
        (b"/v1/admin/tenants/acme/adapters/v/", 404),
        (b"/v1/admin//tenants", 404),
    ],
)
def test_check_path_refuses_dot_segments_separators_and_empty_segments(raw, status):
    from urllib.parse import unquote

    with pytest.raises(LoraplexError) as err:
        check_path(unquote(raw.decode()), raw)
    assert err.value.status == status
    check_path("/v1/admin/tenants/acme/adapters/v.1/versions/2", None)  # dots inside names are fine


# -- CLI -----------------------------------------------------------------------------------------------
@pytest.fixture
def cli(tmp_path, tiny_bert_dir):
    runner, store_url = CliRunner(), str(tmp_path / "store")

    def run(*args: str):
        return runner.invoke(main, [*args, "--store", store_url])

    assert run("base", "register", "tiny", "--path", str(tiny_bert_dir)).exit_code == 0
    run.store = open_store(store_url)
    run.peft = save_peft_lora(tiny_bert_dir, tmp_path / "peft", r=4)
    run.push = ("adapters", "push", str(run.peft), "--tenant", "acme", "--name", "head", "--base", "tiny")
    return run


def test_cli_push_with_a_bad_alias_exits_2_and_stores_nothing(cli):
    assert cli(*cli.push, "--alias", "production").exit_code == 0
    before = _state(cli.store)
    for alias in BAD_ALIASES:
        result = cli(*cli.push, "--alias", alias)
        assert result.exit_code == 2 and "error:" in result.output, (alias, result.output)
        assert _state(cli.store) == before, alias
    result = cli(*cli.push, "--alias", "production", "--alias", "../x")
    assert result.exit_code == 2
    assert _state(cli.store) == before == ([1], {"production": 1, "latest": 1})


def test_cli_rm_refuses_an_aliased_version_and_force_says_what_moved(cli):
    assert cli(*cli.push, "--alias", "production").exit_code == 0
    assert cli(*cli.push).exit_code == 0
    refused = cli("adapters", "rm", "acme/head@1")
    assert refused.exit_code == 2 and "production" in refused.output and "force" in refused.output
    assert _state(cli.store) == ([1, 2], {"production": 1, "latest": 2})
    forced = cli("adapters", "rm", "acme/head@1", "--force")
    assert forced.exit_code == 0, forced.output
    assert "removed alias production" in forced.output and "latest" in forced.output
    assert _state(cli.store) == ([2], {"latest": 2})


def test_cli_show_of_a_missing_adapter_fails_and_json_has_full_digests(cli):
    missing = cli("adapters", "show", "nobody/x")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    pushed = json.loads(cli(*cli.push, "--json").output)[0]
    shown = json.loads(cli("adapters", "show", "acme/head", "--json").output)[0]
    listed = json.loads(cli("adapters", "list", "--json").output)[0]
    digest = cli.store.resolve("acme/head@1").digest
    assert len(digest) == 64 and shown["digest"] == listed["digest"] == digest
    assert "digest" not in pushed or pushed["digest"] == digest
    bases = json.loads(cli("base", "list", "--json").output)
    assert bases[0]["fingerprint"] == cli.store.get_base("tiny").fingerprint
    table = cli("adapters", "show", "acme/head").output
    assert digest[:12] in table and digest not in table  # tables stay short


def test_serve_resolves_a_relative_store_against_the_current_directory(tmp_path, monkeypatch):
    import training.cli as cli_module

    launched = {}
    monkeypatch.setattr(cli_module.os, "execvpe", lambda f, cmd, env: launched.update(env=env, cmd=cmd))
    # The start-up check needs a base and tokens in the store; only the path resolution is tested here.
    monkeypatch.setattr("serving.preflight.check_startup", lambda env: launched.update(checked=env))
    monkeypatch.delenv("LORAPLEX_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for args, expected in (
        (["--store", "mystore"], tmp_path / "mystore"),
        (["--store", "file://rel/store"], tmp_path / "rel/store"),
        ([], tmp_path / ".loraplex/store"),
    ):
        # The default is read at import: pass it as the user's shell would see it.
        args = args or ["--store", DEFAULT_STORE_URL]
        result = runner.invoke(main, ["serve", *args])
        assert result.exit_code == 0, result.output
        assert launched["env"]["LORAPLEX_STORE"] == str(expected)
        assert "--working-dir" in launched["cmd"]  # the server runs elsewhere: hence the absolute path
    runner.invoke(main, ["serve", "--store", "s3://bucket/p?endpoint=http://h:1"])
    assert launched["env"]["LORAPLEX_STORE"] == "s3://bucket/p?endpoint=http://h:1"


def test_demo_refuses_a_port_in_use_before_training(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            main, ["demo", "--store", str(tmp_path / "demo-store"), "--port", str(port)]
        )
    assert result.exit_code != 0
    assert f"port {port}" in result.output and "already in use" in result.output
    assert not (tmp_path / "demo-store").exists()  # refused before anything was trained or stored
