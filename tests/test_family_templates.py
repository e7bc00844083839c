"""Each family's Modelfile TEMPLATE renders what the family's own chat template renders.

The TEMPLATE (modelfiles/<family>.Modelfile) is rendered by Go's own text/template as Ollama
v0.33.0-rc2 runs it (tests/gotemplate.py); the family's chat template by transformers' own Jinja
renderer (render_jinja_template, what apply_chat_template uses), with the generation prompt and
without the leading BOS text, which the runtime adds as a token (pipeline.chattext.without_bos,
what training_prompt uses). Which of the two Ollama uses is its own rule
(pipeline.ollama.prefers_chat_template, a port of server/images.go shouldPreferChatTemplate): a
GGUF template that offers tools or thinking wins, and llama-server renders it natively. So for
every known release of a family this file checks what Ollama's default choice renders against
what training saw (natively: the contract server's model of llama-server, itself checked against
the pinned llama-server's /apply-template), and states where they differ and where
OLLAMA_GO_TEMPLATE=true would.

The chat templates are those of pipeline.vocab (the tiny test bases'), more from the pinned
llama.cpp source (models/templates/), and Meta-Llama-3-Instruct's, which it does not ship, copied
here (LLAMA3_INSTRUCT).
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace

import httpx2
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from conftest import REPO, needs_llama_cpp_built
from gotemplate import render
from ollama_contract import LlamaServers, gguf_chat_format, render_native
from pipeline import llamacpp, vocab
from pipeline.chattext import without_bos
from pipeline.families import BY_NAME, supported
from pipeline.ollama import RENDER_CONVERSATION, family_spec, go_template_capabilities, prefers_chat_template

# Meta-Llama-3-8B-Instruct's chat template (Llama-3.0; bases built on it keep it, e.g.
# Llama-3-ELYZA-JP-8B): Ollama v0.33.0-rc2's template/index.json, the first "llama3-instruct"
# entry (the Jinja template Ollama maps to template/llama3-instruct.gotmpl), byte for byte.
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

@dataclass(frozen=True)
class Release:
    """A release's chat template, as its tokenizer ships it."""

    name: str
    bos: str | None  # the tokenizer's BOS text, which the template may write first
    family: str | None = None  # the template pipeline.vocab gives the family's tiny test base
    file: str | None = None  # else one in the pinned llama.cpp's models/templates/
    source: str | None = None  # else a copy above, where llama.cpp ships none
    gguf_wins: bool = False  # by Ollama's rule, this GGUF template is used instead of our TEMPLATE

    def template(self) -> str:
        if self.family is not None:
            return vocab.chat_template(self.family)
        if self.file is not None:
            return (vocab.models_dir() / "templates" / self.file).read_text(encoding="utf-8")
        return self.source


PHI35 = Release("Phi-3.5-mini-instruct", "<s>", family="phi3")
LLAMA30 = Release("Meta-Llama-3-8B-Instruct", "<|begin_of_text|>", source=LLAMA3_INSTRUCT)
LLAMA31 = Release("Llama-3.1-8B-Instruct", "<|begin_of_text|>", file="meta-llama-Llama-3.1-8B-Instruct.jinja",
                  gguf_wins=True)
LLAMA32 = Release("Llama-3.2-3B-Instruct", "<|begin_of_text|>", family="llama3", gguf_wins=True)
LLAMA33 = Release("Llama-3.3-70B-Instruct", "<|begin_of_text|>", file="meta-llama-Llama-3.3-70B-Instruct.jinja",
                  gguf_wins=True)
QWEN25 = Release("Qwen2.5-7B-Instruct", None, family="qwen2", gguf_wins=True)
QWEN3 = Release("Qwen3-0.6B", None, family="qwen3", gguf_wins=True)
GEMMA3 = Release("Gemma-3 (gemma-3-1b-it)", "<bos>", family="gemma3")  # pipeline.vocab.GEMMA3_CHAT_TEMPLATE

# The release each Modelfile follows exactly, and every release of the family known here.
FOLLOWS = {"phi3": PHI35, "llama3": LLAMA30, "qwen2": QWEN25, "qwen3": QWEN3, "gemma3": GEMMA3}
RELEASES = {"phi3": [PHI35], "llama3": [LLAMA30, LLAMA31, LLAMA32, LLAMA33], "qwen2": [QWEN25],
            "qwen3": [QWEN3], "gemma3": [GEMMA3]}
# The release pipeline/families.py's gguf_template_wins speaks of: the family's current one.
CURRENT = {"phi3": PHI35, "llama3": LLAMA32, "qwen2": QWEN25, "qwen3": QWEN3, "gemma3": GEMMA3}

# Ollama v0.33.0-rc2's template/<name>.json stops, for the template each family follows.
OLLAMA_STOPS = {"phi-3": ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"],
                "llama3-instruct": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "chatml": ["<|im_start|>", "<|im_end|>"],
                "gemma3-instruct": ["<end_of_turn>"]}
END_OF_TURN = {"phi3": "<|end|>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>",
               "gemma3": "<end_of_turn>"}

SYSTEM = {"role": "system", "content": "あなたは丁寧な日本語のアシスタントです。"}
CONVERSATIONS = {
    "one-user": [{"role": "user", "content": "富士山の高さは？"}],
    "system-user": [SYSTEM, {"role": "user", "content": "自己紹介してください。"}],
    "multi-turn": [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "こんにちは！"},
                   {"role": "user", "content": "日本の首都は？"}, {"role": "assistant", "content": "東京です。"},
                   {"role": "user", "content": "人口は？"}],
    "system-multi-turn": [SYSTEM, {"role": "user", "content": "1+1は？"}, {"role": "assistant", "content": "2です。"},
                          {"role": "user", "content": "では2+2は？"}],
    "trailing-assistant": [{"role": "user", "content": "俳句を一つ。"},
                           {"role": "assistant", "content": "古池や\n蛙飛び込む\n水の音"}],
    "system-trailing-assistant": [SYSTEM, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
    "multiline-english": [{"role": "user", "content": "List two colours.\nOne per line."},
                          {"role": "assistant", "content": "Sure:\n\n- red\n- blue"},
                          {"role": "user", "content": "Thanks! 「ありがとう」"}],
    "proof": RENDER_CONVERSATION,
    "proof-with-system": [SYSTEM, *RENDER_CONVERSATION],
}
# An earlier reply that kept its thinking, as a client may send it back.
QWEN3_EARLIER_THINKING = [{"role": "user", "content": "2+3は？"},
                          {"role": "assistant", "content": "<think>\n2に3を足す。\n</think>\n\n5です。"},
                          {"role": "user", "content": "では4+4は？"}]


@pytest.fixture(scope="module", autouse=True)
def pinned_llama_cpp():
    """The real chat templates come from the pinned llama.cpp source."""
    needs_llama_cpp_built()


def trained(release: Release, messages: list[dict], continued: bool = False) -> str:
    """What training renders (apply_chat_template's renderer), less the leading BOS text: with
    the generation prompt, or `continued`, the last message left open (continue_final_message)."""
    rendered, _ = render_jinja_template([messages], chat_template=release.template(), bos_token=release.bos or "",
                                        eos_token="", add_generation_prompt=not continued,
                                        continue_final_message=continued)
    return without_bos(SimpleNamespace(bos_token=release.bos), rendered[0])


def native(release: Release, messages: list[dict]) -> str:
    """What Ollama renders with the release's template as the GGUF's (llama-server, natively)."""
    return render_native(release.template(), messages, release.bos or "", "", adds_bos=True)


def template(family: str) -> str:
    return family_spec(family)[0]


FAMILIES = sorted(FOLLOWS)


def test_every_supported_family_is_covered_here():
    assert sorted(f.modelfile for f in supported()) == FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_the_template_renders_what_the_familys_chat_template_renders(family, conversation):
    messages = CONVERSATIONS[conversation]
    assert render(template(family), messages) == trained(FOLLOWS[family], messages)


ALL_RELEASES = [(f, r) for f in FAMILIES for r in RELEASES[f]]


def release_id(x):
    return x if isinstance(x, str) else x.name


@pytest.mark.parametrize("family, release", ALL_RELEASES, ids=release_id)
def test_where_ollama_picks_our_template_it_renders_what_training_saw(family, release):
    """With OLLAMA_GO_TEMPLATE unset, Ollama renders with the GGUF's own template where that offers
    tools or thinking (next test), and with our TEMPLATE otherwise: then it must render what the
    release's template renders."""
    assert prefers_chat_template(release.template(), template(family)) == release.gguf_wins
    if not release.gguf_wins:
        for messages in CONVERSATIONS.values():
            assert render(template(family), messages) == trained(release, messages)


@pytest.mark.parametrize("release", [r for _, r in ALL_RELEASES if r.gguf_wins], ids=release_id)
def test_where_ollama_picks_the_gguf_template_it_renders_what_training_saw_but_a_date_and_a_prefill(release):
    """Natively, llama-server renders the release's own template as transformers does, with two
    differences: it gives every template date_string, today's date (common/chat.cpp
    common_chat_extra_context), so Llama-3.1/3.3's system header says today where transformers
    writes their default 26 Jul 2024 (registration's prompt check renders with the same context:
    the next test);
    and it continues a final assistant message instead of answering it (llama-server's
    prefill_assistant, which Ollama leaves on), where our TEMPLATEs answer it."""
    for messages in CONVERSATIONS.values():
        want = trained(release, messages, continued=messages[-1]["role"] == "assistant")
        if release in (LLAMA31, LLAMA33):
            assert "Today Date: 26 Jul 2024\n" in want
            want = want.replace("Today Date: 26 Jul 2024\n", f"Today Date: {datetime.now():%d %b %Y}\n")
        assert native(release, messages) == want


def test_the_prompt_proof_renders_a_llama31_base_as_llama_server_does(tmp_path):
    """Registration's prompt check (ollama.training_prompt) gives the template llama-server's extra
    context, so a Llama-3.1 base, whose GGUF template Ollama renders natively with today's date,
    passes it; without that context its system header would say 26 Jul 2024."""
    from pipeline.ollama import training_prompt
    from pipeline.tiny import build_tiny

    base = build_tiny(tmp_path / "llama31", "llama3")
    (base / "chat_template.jinja").write_text(LLAMA31.template(), encoding="utf-8")
    for messages in CONVERSATIONS.values():
        if messages[-1]["role"] == "user":
            assert training_prompt(base, messages) == native(LLAMA31, messages)
            assert f"Today Date: {datetime.now():%d %b %Y}\n" in training_prompt(base, messages)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_phi3_dir, tmp_path_factory):
    """A tiny GGUF to carry each chat template into llama-server (/apply-template reads no weights)."""
    return llamacpp.convert_hf_to_gguf(tiny_phi3_dir, tmp_path_factory.mktemp("native") / "t-phi3.gguf", "q8_0")


@pytest.mark.parametrize("family, release", ALL_RELEASES, ids=release_id)
def test_the_contract_servers_native_render_is_llama_servers(family, release, tiny_gguf, tmp_path):
    """tests/ollama_contract.py render_native against the pinned llama-server's /apply-template, fed
    the body Ollama sends it (the messages only), on a GGUF that carries the release's template. A
    final assistant message is checked where Ollama renders natively by default (gguf_wins):
    llama.cpp continues it after the render without it and a generation prompt it infers by
    comparing renders (common/chat-auto-parser-generator.cpp), which render_native approximates
    by cutting the whole render after the content. The two differ for Phi-3.5's template, which
    writes eos_token where no generation prompt is asked for; Ollama never renders it natively."""
    gguf = tmp_path / "with-template.gguf"
    scripts = llamacpp.converter().parent / "gguf-py"
    subprocess.run([sys.executable, str(scripts / "gguf" / "scripts" / "gguf_new_metadata.py"), "--chat-template",
                    release.template(), str(tiny_gguf), str(gguf), "--force"],
                   env={"PYTHONPATH": str(scripts), "PATH": ""}, check=True, capture_output=True)
    chat_template, bos, eos, adds_bos = gguf_chat_format(gguf)
    assert chat_template == release.template() and adds_bos
    servers = LlamaServers()
    try:
        url = servers.url(str(llamacpp.tool("llama-server")), gguf)
        for messages in [*CONVERSATIONS.values(), QWEN3_EARLIER_THINKING]:
            if messages[-1]["role"] == "assistant" and not release.gguf_wins:
                continue
            answer = httpx2.post(f"{url}/apply-template", json={"messages": messages}, timeout=60)
            assert answer.status_code == 200, answer.text
            assert answer.json()["prompt"] == render_native(chat_template, messages, bos, eos, adds_bos), messages
    finally:
        servers.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_registry_says_whether_the_gguf_template_wins_as_ollamas_rule_does(family):
    entry = BY_NAME[family]
    assert prefers_chat_template(CURRENT[family].template(), template(family)) == entry.gguf_template_wins, (
        f"pipeline/families.py says gguf_template_wins={entry.gguf_template_wins} for {family}, but Ollama's rule "
        f"applied to {CURRENT[family].name}'s template says otherwise")


@pytest.mark.parametrize("release, date", [(LLAMA31, "26 Jul 2024"), (LLAMA32, None), (LLAMA33, "26 Jul 2024")],
                         ids=lambda x: x.name if isinstance(x, Release) else "")
def test_llama31_and_later_with_go_templates_forced_lack_only_the_system_header(release, date):
    """What OLLAMA_GO_TEMPLATE=true would change for Llama-3.1+: their templates open with a system
    header (a knowledge date and a date of the day: 3.1 and 3.3 a fixed one, 3.2 strftime_now, the
    day of rendering), which llama3.Modelfile, following Llama-3.0, does not write. Everything
    else is the same. By default Ollama renders their own template (the tests above)."""
    header = "<|start_header_id|>system<|end_header_id|>\n\n"
    for messages in CONVERSATIONS.values():
        before = datetime.now().strftime("%d %b %Y")
        want = trained(release, messages)
        days = {date} if date else {before, datetime.now().strftime("%d %b %Y")}
        ours = render(template("llama3"), messages)
        if messages[0]["role"] != "system":
            ours = f"{header}<|eot_id|>{ours}"
        dated = [ours.replace(header, f"{header}Cutting Knowledge Date: December 2023\nToday Date: {day}\n\n", 1)
                 for day in days]
        assert want in dated, (want, ours)


@pytest.mark.parametrize("messages, think", [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], True),
    ([SYSTEM, {"role": "assistant", "content": "b"}], False),  # no user query: no reply after one
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, SYSTEM], False),  # not the last
], ids=["after-the-last-query", "no-query", "not-last"])
def test_qwen3_writes_an_empty_think_block_only_before_a_final_reply_to_the_last_query(messages, think):
    want = trained(QWEN3, messages)
    assert ("<think>\n\n</think>\n\nb" in want) == think
    assert render(template("qwen3"), messages) == want


def ollama_filter_think_tags(messages: list[dict]) -> list[dict]:
    """server/routes.go filterThinkTags for a qwen3 model, before it renders: every assistant
    message before the last user message loses a leading <think>...</think> and the whitespace
    after it (thinking/parser.go's Parser fed the whole message)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out = []
    for i, m in enumerate(messages):
        content = m["content"].lstrip()
        if m["role"] == "assistant" and i < last_user and content.startswith("<think>") and "</think>" in content:
            m = {**m, "content": content.split("</think>", 1)[1].lstrip()}
        out.append(m)
    return out


def test_qwen3_earlier_thinking_is_removed_by_ollama_as_by_the_template():
    messages = QWEN3_EARLIER_THINKING
    want = trained(QWEN3, messages)
    assert "2に3を足す" not in want and "<|im_start|>assistant\n5です。<|im_end|>" in want
    assert render(template("qwen3"), ollama_filter_think_tags(messages)) == want
    assert render(template("qwen3"), messages) != want  # the template alone keeps it: Ollama's filter is needed


@pytest.mark.parametrize("family, trims", [("phi3", False), ("llama3", True), ("qwen2", False), ("qwen3", False),
                                           ("gemma3", True)])
def test_content_with_surrounding_whitespace_renders_untrimmed_where_the_template_trims_it(family, trims):
    """Llama-3's and Gemma-3's templates trim each content (`| trim`); Go's text/template has no
    function that could, so there our TEMPLATE renders such content as given."""
    messages = [SYSTEM, {"role": "user", "content": "  前後に空白  \n"}, {"role": "assistant", "content": "はい"},
                {"role": "user", "content": "\n次の質問 "}]
    trimmed = [{**m, "content": m["content"].strip()} for m in messages]
    ours, want = render(template(family), messages), trained(FOLLOWS[family], messages)
    assert (ours != want) == trims
    if trims:
        assert render(template(family), trimmed) == want


def test_no_template_writes_a_bos_text():
    boses = {r.bos for rs in RELEASES.values() for r in rs if r.bos}
    for path in sorted((REPO / "modelfiles").glob("*.Modelfile")):
        found = [b for b in boses if b in family_spec(path.stem)[0]]
        assert not found, f"{path.name}'s TEMPLATE writes {found}: the runtime adds BOS itself"


@pytest.mark.parametrize("family", FAMILIES)
def test_stops_end_the_turn_and_include_ollamas_and_the_modelfile_cites_ollamas_template(family):
    entry = BY_NAME[family]
    _, stops = family_spec(family)
    assert END_OF_TURN[family] in stops
    assert set(OLLAMA_STOPS[entry.ollama_template]) <= set(stops)
    text = (REPO / "modelfiles" / f"{entry.modelfile}.Modelfile").read_text(encoding="utf-8")
    assert f"template/{entry.ollama_template}.gotmpl" in text


@pytest.mark.parametrize("go_template, capabilities", [
    ("{{ range .Messages }}{{ .Content }}{{ end }}", []),
    ("{{ if $.Tools }}{{ json .Tools }}{{ end }}{{ .Prompt }}", ["tools"]),
    ('{{ .Prompt }}{{ "not .Tools" }}{{/* .Suffix */}}', []),  # literals and comments name nothing
    ("{{ .Prompt }}<fim>{{ .Suffix }}", ["insert"]),
])
def test_the_capabilities_of_a_go_template_come_from_the_fields_it_uses(go_template, capabilities):
    assert go_template_capabilities(go_template) == capabilities


def test_a_template_with_tools_of_its_own_keeps_its_place():
    """Ollama's rule can also keep TEMPLATE: same capabilities (tools) on both sides, and only
    the TEMPLATE completes a tool round trip."""
    chat = "{% if tools %}{{ tools }}{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
    ours = ('{{ range .Messages }}{{ if eq .Role "tool" }}<tool_response>{{ .Content }}</tool_response>'
            "{{ end }}{{ range .ToolCalls }}{{ .Function.Name }}{{ end }}{{ end }}{{ .Tools }}")
    assert prefers_chat_template(chat, "{{ range .Messages }}{{ .Content }}{{ end }}")
    assert not prefers_chat_template(chat, ours)
    assert not prefers_chat_template("", "{{ .Prompt }}")  # no chat template in the GGUF
