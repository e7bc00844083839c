"""The Modelfile and registration, against tests/ollama_contract.py: a server that behaves as
Ollama's source says (these tests check what we hand to Ollama, not Ollama itself)."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, small_config, write_config
from makeutil import needs_llama_cpp
from ollama_contract import FakeOllama, running
from pipeline.config import load_config
from pipeline.errors import OllamaError
from pipeline.ollama import PROOF_PROMPT, family_spec, register, render_modelfile, write_modelfile

STOPS = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"]


@pytest.fixture
def cfg(tiny_phi3_dir, tmp_path):
    raw = small_config(tiny_phi3_dir, tmp_path / "b", ollama={"proof": "strict"})  # demo.yaml's is smoke
    return load_config(write_config(tmp_path / "c.yaml", raw))


def test_modelfile_has_template_stops_system_and_parameters(cfg):
    text = render_modelfile(cfg)
    lines = text.splitlines()
    assert "FROM ./gguf/t-q4_k_m.gguf" in lines
    assert (cfg.modelfile_path.parent / "gguf" / "t-q4_k_m.gguf") == cfg.gguf_path("Q4_K_M")
    for stop in STOPS:
        assert f'PARAMETER stop "{stop}"' in lines
    assert f'SYSTEM """{cfg.ollama.system}"""' in lines
    assert "PARAMETER num_ctx 2048" in lines and "PARAMETER temperature 0.7" in lines
    assert 'TEMPLATE """' in text and "<|{{ .Role }}|>" in text and "<|assistant|>" in text


def test_unknown_family(cfg):
    with pytest.raises(OllamaError, match="ollama.family: no template gemma.Modelfile"):
        render_modelfile(cfg.model_copy(update={"ollama": cfg.ollama.model_copy(update={"family": "gemma"})}))


def without_ollama_env(tmp_path) -> dict:
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not (Path(p) / "ollama").exists())
    return {**os.environ, "PATH": path, "OLLAMA_HOST": "127.0.0.1:9"}


def test_register_without_ollama_says_how_to_get_it(cfg, tmp_path):
    write_modelfile(cfg)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "register", "--config", str(cfg.source)],
                          cwd=REPO, capture_output=True, text=True, env=without_ollama_env(tmp_path))
    assert proc.returncode == 1
    assert "Ollama is not available" in proc.stderr and "https://ollama.com/download" in proc.stderr
    assert "OLLAMA_HOST" in proc.stderr
    assert not cfg.ollama_stamp.exists()
    status = subprocess.run([sys.executable, "-m", "pipeline", "ollama-status", "--config", str(cfg.source)],
                            cwd=REPO, capture_output=True, text=True, env=without_ollama_env(tmp_path))
    assert status.returncode == 3 and "Ollama is not available" in status.stdout


@pytest.fixture
def fake_ollama(monkeypatch, tmp_path):
    from pipeline import llamacpp

    needs_llama_cpp()
    with running(tmp_path, str(llamacpp.tool("llama-quantize"))) as host:
        monkeypatch.setenv("OLLAMA_HOST", host)
        yield FakeOllama


@pytest.fixture
def no_ollama_cli(monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "ollama").exists()))


@pytest.fixture
def built(cfg, tiny_phi3_dir):
    """A real (tiny) quantized GGUF and its Modelfile, as make would leave them."""
    from pipeline import llamacpp

    needs_llama_cpp()
    gguf = cfg.gguf_path("Q4_K_M")
    llamacpp.convert_hf_to_gguf(tiny_phi3_dir, gguf, "q8_0", model_name="t-phi3")
    write_modelfile(cfg)
    return cfg


def test_register_through_the_rest_api_uploads_once_and_proves_the_model(built, fake_ollama, no_ollama_cli,
                                                                       capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path))  # a server on this machine: its free disk is said
    stamp = json.loads(register(built).read_text())
    digest = "sha256:" + stamp["gguf_sha256"]
    req = fake_ollama.models[f"{built.ollama.model}:latest"]
    assert req["files"] == {"t-q4_k_m.gguf": digest}
    assert req["blob"] != digest and set(fake_ollama.blobs) == {digest, req["blob"]}  # Ollama's rewrite
    assert stamp["server_digest"] == req["digest"]
    assert req["template"] == family_spec("phi3")[0]
    assert req["parameters"]["stop"] == STOPS and req["parameters"]["num_ctx"] == 2048
    assert req["system"] == built.ollama.system
    assert stamp["proof"] == {"mode": "strict", "prompt": PROOF_PROMPT, "answer": fake_ollama.answer,
                              "done_reason": "stop"}
    out = capsys.readouterr().out
    assert "[ollama] validating GGUF model" in out and "[ollama] success" in out  # create's stream, as it came
    assert "Ollama renders the prompt training saw; it uses TEMPLATE from modelfiles/phi3.Modelfile" in out
    size = built.gguf_path("Q4_K_M").stat().st_size
    assert f"create needs about {2 * size / 1e6:.1f} MB free" in out and "pruned at its next start" in out
    assert f"; {tmp_path} has " in out
    # a second registration finds the blob on the server and does not upload it again
    fake_ollama.calls.clear()
    register(built)
    assert not any(c.startswith("POST /api/blobs") for c in fake_ollama.calls)
    assert "still has t-q4_k_m.gguf" in capsys.readouterr().out
    # a restart prunes the upload (only the rewrite is referenced): the next registration uploads again
    fake_ollama.restart()
    assert digest not in fake_ollama.blobs
    register(built)
    assert "POST /api/blobs/" + digest in fake_ollama.calls


def test_client_digest_matches_what_the_server_checks(built, fake_ollama, tmp_path):
    from pipeline.ollama import OllamaClient

    gguf = built.gguf_path("Q4_K_M")
    with pytest.raises(OllamaError, match="digest mismatch"):
        OllamaClient().push_blob(gguf, "sha256:" + "0" * 64)


@pytest.mark.parametrize("done_reason,answer,message", [
    ("length", "ずっと話し続けます", "not by a stop token"),
    ("stop", "", "the answer is empty"),
    ("stop", "はい<|im_end|>", "raw special token"),
])
def test_a_model_that_does_not_answer_properly_gets_no_stamp(built, fake_ollama, no_ollama_cli,
                                                             done_reason, answer, message):
    fake_ollama.done_reason, fake_ollama.answer = done_reason, answer
    with pytest.raises(OllamaError, match=message):
        register(built)
    assert not built.ollama_stamp.exists()


def test_a_broken_gguf_is_never_uploaded(built, fake_ollama, no_ollama_cli):
    gguf = built.gguf_path("Q4_K_M")
    gguf.write_bytes(b"GGUX" + gguf.read_bytes()[4:])
    with pytest.raises(Exception, match="t-q4_k_m.gguf"):
        register(built)
    assert not fake_ollama.blobs and not built.ollama_stamp.exists()


def test_family_spec_matches_the_modelfile(cfg):
    template, stops = family_spec("phi3")
    assert stops == STOPS and f'TEMPLATE """{template}"""' in render_modelfile(cfg)


@pytest.mark.skipif(not os.environ.get("OLLAMA_HOST"), reason="OLLAMA_HOST unset: the real end-to-end test needs one")
def test_real_ollama_registers_answers_and_stops(built):
    """Against a real Ollama at OLLAMA_HOST: create, chat, stop."""
    from pipeline.ollama import unavailable_reason

    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    tiny = built.model_copy(update={"ollama": built.ollama.model_copy(update={"proof": "smoke"})})
    stamp = json.loads(register(tiny).read_text())  # a tiny random model: the smoke proof
    assert stamp["proof"]["mode"] == "smoke" and stamp["proof"]["done_reason"] in ("stop", "length")


CONVERSATIONS = [
    [{"role": "user", "content": "こんにちは"}],
    [{"role": "system", "content": "丁寧に答えてください。"}, {"role": "user", "content": "富士山の高さは？"}],
    [{"role": "user", "content": "おすすめの本は？"}, {"role": "assistant", "content": "『坊っちゃん』です。"},
     {"role": "user", "content": "作者は？"}],
    [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "黄金比は？\n改行も。"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system", "multi-turn", "mixed"])
def test_ollama_template_renders_what_the_tokenizer_renders(tiny_phi3_dir, messages):
    """Ollama's TEMPLATE (rendered by tests/gotemplate.py: Go's own text/template, run as
    Ollama's /api/chat runs it) gives the same prompt text as the model's own chat template."""
    from gotemplate import render
    from transformers import AutoTokenizer

    template, _ = family_spec("phi3")
    want = AutoTokenizer.from_pretrained(str(tiny_phi3_dir)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert render(template, messages) == want


def test_the_oracle_can_tell_a_wrong_template():
    from gotemplate import render

    wrong = '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}\n{{ end }}<|assistant|>\n'
    got = render(wrong, [{"role": "user", "content": "hi"}])
    assert got == "<|user|>\nhi\n<|assistant|>\n"  # no <|end|>: the Phi-3 check would fail it


def test_stops_are_checked_against_the_models_own_files(cfg, tmp_path):
    from pipeline.ollama import required_stops

    base = cfg.resolve(cfg.model.base)
    assert required_stops(base) == set(STOPS)
    custom = cfg.model_copy(update={"ollama": cfg.ollama.model_copy(
        update={"template": "{{ .Prompt }}", "stop": ["<|end|>", "<|user|>"]})})
    with pytest.raises(OllamaError, match=r"stops lack \['<\|assistant\|>', '<\|endoftext\|>', '<\|system\|>'\]"):
        write_modelfile(custom)
    assert not custom.modelfile_path.exists()
    full = cfg.model_copy(update={"ollama": cfg.ollama.model_copy(update={"template": "{{ .Prompt }}", "stop": STOPS})})
    text = write_modelfile(full).read_text(encoding="utf-8")
    assert 'TEMPLATE """{{ .Prompt }}"""' in text and "# Chat format from ollama.template" in text


def test_custom_template_needs_its_stops(tiny_phi3_dir, tmp_path):
    from pipeline.config import ConfigError

    bad = small_config(tiny_phi3_dir, tmp_path / "b", ollama={"template": "{{ .Prompt }}"})
    with pytest.raises(ConfigError, match="ollama.template and ollama.stop go together"):
        load_config(write_config(tmp_path / "c.yaml", bad))


# -- OLLAMA_HOST: envconfig/config.go Host, with the cases of envconfig/config_test.go TestHost ----------
HOST_CASES = {
    "": "http://127.0.0.1:11434", "1.2.3.4": "http://1.2.3.4:11434", ":1234": "http://:1234",
    "1.2.3.4:1234": "http://1.2.3.4:1234", "example.com": "http://example.com:11434",
    "example.com:1234": "http://example.com:1234", ":0": "http://:0", ":66000": "http://:11434",
    ":-1": "http://:11434", "[::1]": "http://[::1]:11434", "[::]": "http://[::]:11434",
    "::1": "http://[::1]:11434", "[::1]:1337": "http://[::1]:1337", " 1.2.3.4 ": "http://1.2.3.4:11434",
    '"1.2.3.4"': "http://1.2.3.4:11434", ' " 1.2.3.4 " ': "http://1.2.3.4:11434",
    "'1.2.3.4'": "http://1.2.3.4:11434", "http://1.2.3.4": "http://1.2.3.4:80",
    "http://1.2.3.4:4321": "http://1.2.3.4:4321", "https://1.2.3.4": "https://1.2.3.4:443",
    "https://1.2.3.4:4321": "https://1.2.3.4:4321", "https://example.com/ollama": "https://example.com:443/ollama",
    "ollama.com": "https://ollama.com:443",
    # beyond TestHost, from the same code: a proxy path on http, bare host:port in a container
    "http://proxy/ollama": "http://proxy:80/ollama", "host.docker.internal:11434": "http://host.docker.internal:11434",
    "0.0.0.0": "http://0.0.0.0:11434",
}


@pytest.mark.parametrize("value,want", HOST_CASES.items(), ids=[repr(k) for k in HOST_CASES])
def test_ollama_host_is_parsed_as_envconfig_host(value, want, monkeypatch):
    from pipeline.ollama import ollama_host
    from pipeline.ollama_rules import parse_host

    assert parse_host(value) == want
    monkeypatch.setenv("OLLAMA_HOST", value)
    assert ollama_host() == want  # what the client and every message use


# envconfig/config_test.go TestConnectableHost, all its cases; then two of ours: Go's net.Dial takes an
# empty host (":1234") as the local system, and a path prefix is kept
CONNECT_CASES = {
    "": "http://127.0.0.1:11434", "127.0.0.1": "http://127.0.0.1:11434", "127.0.0.1:1234": "http://127.0.0.1:1234",
    "0.0.0.0": "http://127.0.0.1:11434", "0.0.0.0:1234": "http://127.0.0.1:1234", "[::]": "http://[::1]:11434",
    "[::]:1234": "http://[::1]:1234", "[::1]": "http://[::1]:11434", "[::1]:1234": "http://[::1]:1234",
    "192.168.1.5": "http://192.168.1.5:11434", "192.168.1.5:8080": "http://192.168.1.5:8080",
    "example.com": "http://example.com:11434", "example.com:1234": "http://example.com:1234",
    "https://0.0.0.0:4321": "https://127.0.0.1:4321",
    ":1234": "http://127.0.0.1:1234", "https://example.com/ollama": "https://example.com:443/ollama",
}


@pytest.mark.parametrize("value,want", CONNECT_CASES.items(), ids=[repr(k) for k in CONNECT_CASES])
def test_the_client_connects_where_ollama_connects(value, want, monkeypatch):
    from pipeline.ollama import OllamaClient

    monkeypatch.setenv("OLLAMA_HOST", value)
    assert OllamaClient().base == want


def test_a_path_prefix_reaches_the_server(built, fake_ollama, monkeypatch):
    """OLLAMA_HOST=http://127.0.0.1:PORT/ollama: requests go to /ollama/api/... (api/client.go JoinPath)."""
    from pipeline.ollama import OllamaClient

    port = os.environ["OLLAMA_HOST"].rsplit(":", 1)[1]
    monkeypatch.setenv("OLLAMA_HOST", f"http://127.0.0.1:{port}/ollama")
    with pytest.raises(OllamaError):
        OllamaClient().version()  # the contract server has no /ollama prefix: 404, not a wrong port
    assert fake_ollama.calls[-1] == "GET /ollama/api/version"


# -- model names: types/model/name_test.go testCases (ParseNameBare(s).IsValid()) --------------------------
NAME_CASES = {
    "": False, "_why/_the/_lucky:_stiff": True, "h/n/m:t": True, "host/namespace/model:tag": True,
    "host/namespace/model": False, "namespace/model": False, "model": False, "h/nn/mm:t": True,
    "m": False, "n/m:": False, "h/n/m": False, "@t": False, "m@d": False, "^": False, "mm:": False,
    "/nn/mm": False, "//": False, "//mm": False, "hh//": False, "//mm:@": False, "00@": False, "@": False,
    "-hh/nn/mm:tt": False, "hh/-nn/mm:tt": False, "hh/nn/-mm:tt": False, "hh/nn/mm:-tt": False,
    "host:https/namespace/model:tag": True, "host/name:space/model:tag": False,
    "8" * 80 + "/" + "8" * 80 + "/" + "8" * 80 + ":" + "8" * 80: True,
    "3" * 350 + "/" + "8" * 80 + "/" + "8" * 80 + ":" + "8" * 80: True,
}


@pytest.mark.parametrize("name,valid", NAME_CASES.items(), ids=[n[:20] or "empty" for n in NAME_CASES])
def test_model_names_follow_types_model_name(name, valid):
    from pipeline.ollama_rules import name_is_valid, parse_name_bare

    assert name_is_valid(parse_name_bare(name)) is valid


@pytest.mark.parametrize("name", [*NAME_CASES, "agiasi-borea", "Agiasi.Borea:3.5", "agiasi borea", "名前"],
                         ids=lambda n: n[:20] or "empty")
def test_the_contract_servers_own_name_rules_agree_with_the_clients(name):
    """Two copies of types/model/name.go, each written from Ollama's source: the client's
    (pipeline/ollama_rules.py) and the contract server's own (tests/ollama_contract.py)."""
    import ollama_contract
    from pipeline.ollama_rules import display_shortest, name_is_valid, parse_name

    assert ollama_contract.name_is_valid(name) is name_is_valid(parse_name(name))
    assert ollama_contract.display_shortest(name) == display_shortest(name)


def test_display_shortest_is_how_tags_lists_a_model():
    from pipeline.ollama_rules import display_shortest, name_problem

    assert display_shortest("agiasi-borea") == "agiasi-borea:latest"
    assert display_shortest("me/agiasi:v1") == "me/agiasi:v1"
    assert display_shortest("example.com/me/agiasi") == "example.com/me/agiasi:latest"
    assert name_problem("agiasi-borea") is None and name_problem("Agiasi.Borea:3.5") is None
    assert name_problem("agiasi borea") and name_problem("agiasi:cloud") and name_problem("x:y-cloud")


# -- one registration path, the same chat format on it ----------------------------------------------
@pytest.fixture
def failing_cli(tmp_path, monkeypatch):
    """An `ollama` on PATH that fails if called: registration must not use it."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "ollama"
    script.write_text("#!/bin/sh\necho 'the CLI was called' >&2\nexit 9\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


def reconfigured(cfg, tmp_path, **ollama):
    raw = small_config(cfg.resolve(cfg.model.base), Path(cfg.run_dir).parent, ollama={"proof": "strict", **ollama})
    new = load_config(write_config(tmp_path / "c2.yaml", raw))
    write_modelfile(new)
    return new


# Phi-3's format written another way: it renders what the model's own template renders
CUSTOM = "{{ range $m := .Messages }}{{ printf \"<|%s|>\\n%s<|end|>\\n\" $m.Role $m.Content }}{{ end }}<|assistant|>\n"


def test_custom_template_stops_and_unprintable_runes_reach_the_server(built, fake_ollama, failing_cli, tmp_path):
    """REST only, even with an `ollama` CLI on PATH; the config's TEMPLATE, stops and a system
    prompt holding U+3000, U+00A0 and U+200B arrive as configured (parser/parser.go would drop them)."""
    system = "丁寧に\u3000答えて\u00a0ください\u200b。"
    cfg = reconfigured(built, tmp_path, template=CUSTOM, stop=STOPS[::-1], system=system,
                       parameters={"temperature": 1, "num_ctx": 2048})
    register(cfg)
    req = fake_ollama.models["agiasi-demo:latest"]
    assert req["template"] == CUSTOM and req["system"] == system
    assert req["parameters"] == {"temperature": 1.0, "num_ctx": 2048, "stop": STOPS[::-1]}
    assert isinstance(req["parameters"]["temperature"], float)  # api/types.go: float32 field
    assert fake_ollama.last_prompt.startswith(f"<|system|>\n{system}<|end|>\n<|user|>\n")
    text = cfg.modelfile_path.read_text(encoding="utf-8")
    assert f'TEMPLATE """{CUSTOM}"""' in text and f'SYSTEM """{system}"""' in text
    assert "PARAMETER temperature 1.0" in text and "PARAMETER num_ctx 2048" in text


def test_the_modelfile_always_sets_num_ctx(built, tmp_path, fake_ollama):
    raw = small_config(built.resolve(built.model.base), Path(built.run_dir).parent)
    raw["ollama"]["parameters"].pop("num_ctx")
    cfg = load_config(write_config(tmp_path / "c3.yaml", raw))
    assert "PARAMETER num_ctx 4096" in render_modelfile(cfg).splitlines()
    from pipeline.ollama import create_parameters

    assert create_parameters(cfg)["num_ctx"] == cfg.served_context == 4096


def test_what_the_server_stores_passes_from_map(built, fake_ollama, no_ollama_cli):
    """A chat runs the stored parameters through Options.FromMap; the contract server refuses
    a string for a number as Ollama does, and ours never sends one."""
    from ollama_contract import OPTION_TYPES, from_map
    from pipeline.ollama_rules import OPTIONS

    assert set(OPTION_TYPES) == set(OPTIONS)  # both copies of api/types.go's Options know the same keys
    assert from_map({"num_ctx": "4096"}) == 'option "num_ctx" must be of type integer'
    assert from_map({"use_mmap": 1}) == 'option "use_mmap" must be of type boolean'
    assert from_map({"stop": "<|end|>"}) == 'option "stop" must be of type array'
    assert from_map({"stop": ["<|end|>", 1]}) == 'option "stop" must be of an array of strings'
    assert from_map({"temperature": 1, "num_ctx": 4096.0, "seed": None}) is None  # JSON numbers are float64
    assert from_map({"temprature": "x"}) is None  # unknown: dropped with a log line only
    register(built)
    assert from_map(fake_ollama.models["agiasi-demo:latest"]["parameters"]) is None


# -- failure messages -------------------------------------------------------------------------
def test_a_repeat_abort_is_named(built, fake_ollama, no_ollama_cli):
    """31 repeats of one piece pass Ollama's rule, a 32nd aborts the stream without a done line."""
    fake_ollama.pieces = ["は"] + ["い"] * 31
    register(built)
    fake_ollama.pieces = ["は"] + ["い"] * 32
    with pytest.raises(OllamaError, match="repeats one token more than 30 times") as e:
        register(built)
    assert "None" not in str(e.value) and not built.ollama_stamp.exists()


def test_an_old_server_is_named(built, fake_ollama, no_ollama_cli):
    fake_ollama.version = "0.11.4"
    with pytest.raises(OllamaError, match=r"Ollama 0.11.4 at .* is too old.*_debug_render_only.*0.11.5"):
        register(built)
    fake_ollama.version = "0.0.0"  # a development build: not judged by its number
    register(built)


def test_a_timeout_is_not_a_missing_server(built, fake_ollama):
    """A server that accepts the request but answers late: a timeout, not "no server answers"."""
    import socket

    from pipeline.ollama import NoServerError, OllamaClient, OllamaTimeout

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts connections, never answers
    try:
        client = OllamaClient(host=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        with pytest.raises(OllamaTimeout, match="sent nothing for 0.5 s while creating x.*make ollama"):
            client.create("x", {}, "", "", {})
    finally:
        silent.close()
    with pytest.raises(NoServerError, match="no Ollama server answers"):
        OllamaClient(host="http://127.0.0.1:9").create("x", {}, "", "", {})


def test_the_stamp_follows_the_server(built, fake_ollama, no_ollama_cli, monkeypatch, capsys):
    """After `ollama rm` (or another OLLAMA_HOST), plan removes the stamp so make registers again;
    ollama-run then says the model is gone instead of a bare 404; with no server the stamp stays."""
    from pipeline.ollama import ModelNotFound, ask
    from pipeline.plan import write_plan

    register(built)
    write_plan(built)
    assert built.ollama_stamp.exists()  # the server still has it, same digest
    del fake_ollama.models["agiasi-demo:latest"]
    with pytest.raises(ModelNotFound, match="has no model agiasi-demo.*make ollama"):
        ask(built, "こんにちは")
    port = os.environ["OLLAMA_HOST"]
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    register_again = json.loads(built.ollama_stamp.read_text())
    write_plan(built)
    assert built.ollama_stamp.exists() and "keeping ollama.json" in capsys.readouterr().err
    monkeypatch.setenv("OLLAMA_HOST", port)
    write_plan(built)
    assert not built.ollama_stamp.exists() and "has no model agiasi-demo" in capsys.readouterr().err
    register(built)
    assert json.loads(built.ollama_stamp.read_text()) == register_again
    # created again with another system prompt elsewhere: another digest, re-registered
    fake_ollama.models["agiasi-demo:latest"]["digest"] = "0" * 64
    write_plan(built)
    assert not built.ollama_stamp.exists() and "with digest 000000000000" in capsys.readouterr().err


def test_the_contract_server_rejects_what_ollama_rejects(built, fake_ollama):
    """Each refusal as Ollama gives it (server/create.go, server/routes.go), run against our client:
    checks before the stream are HTTP errors, failures during it are {"error"} lines in a 200."""
    import httpx2

    from pipeline.ollama import OllamaClient

    client = OllamaClient()
    digest = "sha256:" + "1" * 64
    with pytest.raises(OllamaError, match="invalid model name"):
        client.create("bad name", {"x.gguf": digest}, "", "", {})
    for path in ("/abs/x.gguf", "../x.gguf", "a//x.gguf"):  # io/fs.ValidPath
        with pytest.raises(OllamaError, match="file path must be relative"):
            client.create("good", {path: digest}, "", "", {})
    with pytest.raises(OllamaError, match=r"creating good .*failed \(400\): invalid digest format"):
        client.create("good", {"x.gguf": ""}, "", "", {})
    with pytest.raises(OllamaError, match="failed while creating good: invalid digest format"):
        client.create("good", {"x.gguf": "sha256:xyz"}, "", "", {})
    with pytest.raises(OllamaError, match="failed while creating good: open sha256-1+: no such file"):
        client.create("good", {"x.gguf": digest}, "", "", {})  # a missing blob: 500, or a line in a stream
    base = os.environ["OLLAMA_HOST"]
    missing = httpx2.post(f"http://{base}/api/create", json={"model": "good", "files": {"x.gguf": digest},
                                                             "stream": False})
    assert missing.status_code == 500
    assert httpx2.head(f"http://{base}/api/blobs/sha256:xyz").status_code == 400  # malformed: 400, not 404
    fake_ollama.blobs[digest] = b"not a gguf"
    with pytest.raises(OllamaError, match="supplied file was not in GGUF format"):
        client.create("good", {"x.gguf": digest}, "", "", {})
    gguf = built.gguf_path("Q4_K_M")
    real = "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    client.push_blob(gguf, real)
    with pytest.raises(OllamaError, match="template error: template: .*unexpected EOF"):
        client.create("good", {"x.gguf": real}, "{{ range .Messages }}", "", {})
    client.create("good", {"x.gguf": real}, "{{ .Prompt }}", "", {"num_ctx": "4096"})
    with pytest.raises(OllamaError, match='option "num_ctx" must be of type integer'):
        client.chat("good", [{"role": "user", "content": "hi"}], {})
    streamed = httpx2.post(f"http://{base}/api/chat", json={"model": "good", "messages": []})
    assert streamed.status_code == 500  # FromMap fails before the stream starts
    client.create("good", {"x.gguf": real}, "{{ .Prompt }}", "", {})
    lines = httpx2.post(f"http://{base}/api/chat", json={"model": "good", "messages": []}).text.splitlines()
    assert len(lines) > 2 and json.loads(lines[-1])["done"] is True  # NDJSON unless "stream": false


# -- the prompt Ollama really renders (_debug_render_only) -------------------------------------------

def test_a_template_that_renders_another_prompt_is_caught(built, fake_ollama, no_ollama_cli, tmp_path):
    """A TEMPLATE that drops Phi-3's newlines: created fine, but the rendered prompt is not training's."""
    wrong = "{{ range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>"
    cfg = reconfigured(built, tmp_path, template=wrong, stop=STOPS)
    with pytest.raises(OllamaError, match=r"renders another prompt than training saw, at character 10: "
                                          r"Ollama '<\|system\|>.*training '<\|system\|>\\n.*TEMPLATE from "
                                          r"ollama.template.*ollama.family, or ollama.template") as e:
        register(cfg)
    assert "natively" not in str(e.value) and not cfg.ollama_stamp.exists()
    assert "POST /api/chat" in fake_ollama.calls  # asked with _debug_render_only, never answered


@pytest.fixture
def gguf_with_own_template(built, tiny_phi3_dir, tmp_path):
    """The served GGUF converted from a copy of the base whose chat template mentions tools and
    adds a line training never saw: Ollama prefers such a template to TEMPLATE."""
    import shutil

    from pipeline import llamacpp

    copy = shutil.copytree(tiny_phi3_dir, tmp_path / "with-tools")
    jinja = copy / "chat_template.jinja"
    jinja.write_text("{%- if tools %}{{ tools }}{% endif %}ツールが使えます。\n" + jinja.read_text(encoding="utf-8"),
                     encoding="utf-8")
    config = json.loads((copy / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    llamacpp.convert_hf_to_gguf(copy, built.gguf_path("Q4_K_M"), "q8_0", model_name="t-phi3")
    write_modelfile(built)
    return built


def test_a_gguf_template_that_ollama_prefers_is_named(gguf_with_own_template, fake_ollama, no_ollama_cli):
    cfg = gguf_with_own_template
    with pytest.raises(OllamaError, match=r"renders another prompt.*Ollama 'ツールが使えます。.*"
                                          r"t-q4_k_m.gguf's own chat template, natively: it mentions 'tools'.*"
                                          r"OLLAMA_GO_TEMPLATE=true"):
        register(cfg)
    assert fake_ollama.last_prompt.startswith("ツールが使えます。")
    fake_ollama.go_template = True  # OLLAMA_GO_TEMPLATE=true on the server: TEMPLATE wins again
    register(cfg)
    assert fake_ollama.last_prompt.startswith("<|system|>\n")


def test_the_stops_ollama_stored_are_checked(built, fake_ollama, no_ollama_cli, monkeypatch):
    from ollama_contract import format_parameters

    from pipeline.ollama import registered_stops

    text = format_parameters({"stop": STOPS, "num_ctx": 2048.0, "temperature": 0.7})
    assert 'stop                           "<|end|>"' in text.splitlines()  # %-30s %#v
    assert "num_ctx                        2048" in text.splitlines()
    assert registered_stops(text) == STOPS
    monkeypatch.setattr("ollama_contract.format_parameters", lambda p: format_parameters(
        {**p, "stop": [s for s in p["stop"] if s != "<|endoftext|>"]}))
    with pytest.raises(OllamaError, match=r"stored no stop \['<\|endoftext\|>'\]"):
        register(built)
