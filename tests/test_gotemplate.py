"""The template oracle (tests/gotemplate.py, tests/gotmpl) is Go's own text/template run as
Ollama v0.33.0-rc2 (fb30760) runs it: Go's constructs and error messages, Ollama's funcs,
collate and values, and its legacy .Prompt/.Response path, checked against strings taken from
Ollama's own tests (template/template_test.go) and its shipped Phi-3 template."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO
from gotemplate import TemplateError, parse_error, render
from pipeline.ollama import family_spec

HI = [{"role": "user", "content": 'hi "x"'}]


@pytest.mark.parametrize("template, want", [
    ('{{ range .Messages }}{{ printf "%s=%q;" .Role .Content }}{{ end }}', 'user="hi \\"x\\"";'),
    ("{{ range .Messages }}{{ slice .Content 1 3 }}{{ end }}", 'i '),
    # and/or stop at the first deciding argument: index 9 would fail if it were evaluated
    ("{{ if or (eq (len .Messages) 1) (index .Messages 9) }}one{{ end }}", "one"),
    ("{{ if and (gt (len .Messages) 1) (index .Messages 9) }}two{{ else }}not two{{ end }}", "not two"),
    ("a  \n {{- /* gone */ -}} \n  b {{- 1 }}", "ab1"),
    ('{{ define "turn" }}[{{ .Role }}]{{ end }}{{ range .Messages }}{{ template "turn" . }}{{ end }}', "[user]"),
    ('{{ with $m := index .Messages 0 }}{{ $m.Role | len }}{{ end }}', "4"),
    # Ollama's json func is Go's encoding/json, which escapes < and > in strings
    ('{{ json "<|end|>" }} {{ json .Messages }}',
     '"\\u003c|end|\\u003e" [{"Role":"user","Content":"hi \\"x\\"","Thinking":"","Images":null,'
     '"ToolCalls":null,"ToolName":"","ToolCallID":""}]'),
])
def test_go_constructs_render_as_go_renders_them(template, want):
    assert render(template, HI) == want


@pytest.mark.parametrize("template, error", [
    ("{{ .Prompt ", "template: :1: unclosed action"),
    ("{{ range .Messages }}", "template: :1: unexpected EOF"),
    ("{{ .Content }", 'template: :1: unexpected "}" in operand'),
    ("{{ nofunc .Content }}", 'template: :1: function "nofunc" not defined'),
    # Ollama's own check (template/template.go Identifiers), from its TestParseError
    ('{{define "x"}}{{template "x"}}{{end}}{{template "x"}}', "undefined template specified"),
])
def test_a_parse_error_is_gos_message(template, error):
    assert parse_error(template) == error
    with pytest.raises(TemplateError) as caught:
        render(template, HI)
    assert str(caught.value) == error


def test_a_template_that_parses_has_no_parse_error_but_may_fail_to_execute():
    assert parse_error("{{ range .Messages }}{{ .Content }}{{ end }}") is None
    template = "{{ index .Messages 3 }}"
    assert parse_error(template) is None
    with pytest.raises(TemplateError, match=r"^template: :1:3: executing \"\" at <index \.Messages 3>: "
                                            r"error calling index: index out of range: 3$"):
        render(template, HI)


def test_a_template_using_messages_only_inside_a_chain_gets_the_legacy_path():
    """template/template.go Identifiers has no case for a chain such as (index .Messages 0).Content,
    so Ollama does not see .Messages there: the template gets .System/.Prompt/.Response, no
    .Messages, and {{ .Response }} appended."""
    with pytest.raises(TemplateError, match="error calling index: index of untyped nil"):
        render("{{ (index .Messages 0).Content }}", HI)
    assert render("{{ (index .Messages 0).Content }}{{ if .Messages }}{{ end }}", HI) == 'hi "x"'
    assert render("<{{ .Prompt }}>", HI + [{"role": "assistant", "content": "yo"}]) == '<hi "x">yo'


LIST = "{{ range .Messages }}[{{ .Role }}:{{ .Content }}]{{ end }}|{{ .System }}"


@pytest.mark.parametrize("messages, want", [
    # consecutive messages of one role become one, joined by a blank line (Ollama's TestCollate)
    ([{"role": "user", "content": "Hello"}, {"role": "user", "content": "How are you?"}],
     "[user:Hello\n\nHow are you?]|"),
    # every system message goes into .System, and also stays in .Messages where it was
    ([{"role": "system", "content": "s1"}, {"role": "user", "content": "u"},
      {"role": "system", "content": "s2"}, {"role": "assistant", "content": "a"}],
     "[system:s1][user:u][system:s2][assistant:a]|s1\n\ns2"),
    ([{"role": "system", "content": "s1"}, {"role": "system", "content": "s2"}, {"role": "user", "content": "u"}],
     "[system:s1\n\ns2][user:u]|s1\n\ns2"),
    # tool results are never merged
    ([{"role": "tool", "content": "sunny", "tool_name": "get_weather"},
      {"role": "tool", "content": "72F", "tool_name": "get_temperature"}],
     "[tool:sunny][tool:72F]|"),
    # the API lower-cases a role (api/types.go Message.UnmarshalJSON), so these two merge
    ([{"role": "User", "content": "a"}, {"role": "user", "content": "b"}], "[user:a\n\nb]|"),
])
def test_collate_merges_and_gathers_as_ollama_does(messages, want):
    assert render(LIST, messages) == want


@pytest.mark.parametrize("think, want", [
    (None, "false||false"), (False, "false||true"), (True, "true|medium|true"), ("high", "true|high|true"),
])
def test_think_values(think, want):
    """server/prompt.go renderPrompt: Think, ThinkLevel (true alone means "medium"), IsThinkSet."""
    template = "{{ range .Messages }}{{ end }}{{ .Think }}|{{ .ThinkLevel }}|{{ .IsThinkSet }}"
    assert render(template, HI, think=think) == want


def test_thinking_tools_and_tool_calls_reach_the_template():
    """Ollama's TestTemplateArgumentsJSON / TestTemplatePropertiesRange: arguments and properties
    print as JSON and can be ranged over; .Tools prints as JSON."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"location": {"type": "string", "description": "City"}}}}}]
    messages = [{"role": "assistant", "content": "", "thinking": "hmm", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"unit": "celsius", "location": "Tokyo"}}}]}]
    template = ("{{ range .Messages }}{{ .Thinking }}{{ range .ToolCalls }} {{ .Function.Name }}"
                "{{ .Function.Arguments }}{{ end }}{{ end }}{{ range .Tools }}"
                "{{ range $name, $prop := .Function.Parameters.Properties }} {{ $name }}:{{ $prop.Type }}"
                " {{ toTypeScriptType $prop }}{{ end }}{{ end }} {{ .Tools }}")
    assert render(template, messages, tools=tools) == (
        'hmm get_weather{"location":"Tokyo","unit":"celsius"} location:string string '
        '[{"type":"function","function":{"name":"get_weather","description":"",'
        '"parameters":{"type":"object","properties":{"location":{"type":"string","description":"City"}}}}}]')


# template/template_test.go TestExecuteWithMessages, "mistral system" and "mistral assistant":
# a template without .Messages runs once per exchange with .System/.Prompt/.Response, the
# last time only up to its .Response, and gives what the .Messages version gives.
MISTRAL_SYSTEM = "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}"
MISTRAL = [
    ([{"role": "system", "content": "You are a helpful assistant!"}, {"role": "user", "content": "Hello friend!"},
      {"role": "assistant", "content": "Hello human!"}, {"role": "user", "content": "What is your name?"}],
     [MISTRAL_SYSTEM + "{{ .Prompt }}[/INST] ",
      MISTRAL_SYSTEM + "{{ .Prompt }}[/INST] {{ .Response }}",
      MISTRAL_SYSTEM + '\n{{- range .Messages }}\n{{- if eq .Role "user" }}{{ .Content }}[/INST] '
      '{{ else if eq .Role "assistant" }}{{ .Content }}[INST] {{ end }}\n{{- end }}'],
     "[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human![INST] What is your name?[/INST] "),
    ([{"role": "user", "content": "Hello friend!"}, {"role": "assistant", "content": "Hello human!"},
      {"role": "user", "content": "What is your name?"}, {"role": "assistant", "content": "My name is Ollama and I"}],
     ["[INST] {{ .Prompt }}[/INST] ", "[INST] {{ .Prompt }}[/INST] {{ .Response }}",
      '\n{{- range $i, $m := .Messages }}\n{{- if eq .Role "user" }}[INST] {{ .Content }}[/INST] '
      '{{ else if eq .Role "assistant" }}{{ .Content }}{{ end }}\n{{- end }}'],
     "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] My name is Ollama and I"),
]


@pytest.mark.parametrize("messages, templates, want", MISTRAL, ids=["mistral-system", "mistral-assistant"])
def test_the_legacy_prompt_response_path_renders_as_ollamas_tests_expect(messages, templates, want):
    for template in templates:
        assert render(template, messages) == want, template


# Ollama's shipped Phi-3 template, template/phi-3.gotmpl at v0.33.0-rc2 (fb30760; the file's last
# change is 413ae39), byte for byte: what Ollama uses for a Phi-3 GGUF that comes without a TEMPLATE.
OLLAMA_PHI3 = '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n'

PHI3_CASES = [
    ([{"role": "system", "content": "丁寧に。"}, {"role": "user", "content": "富士山は？"}],
     "<|system|>\n丁寧に。<|end|>\n<|user|>\n富士山は？<|end|>\n<|assistant|>\n"),
    # a conversation ending on the assistant's turn still ends with the prompt for an answer,
    # as Phi-3's own chat template does with add_generation_prompt
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
     "<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|assistant|>\n"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
      {"role": "user", "content": "d\n"}],
     "<|user|>\na\n\nb<|end|>\n<|assistant|>\nc<|end|>\n<|user|>\nd\n<|end|>\n<|assistant|>\n"),
]


@pytest.mark.parametrize("messages, want", PHI3_CASES, ids=["system-user", "user-assistant", "merged-multi-turn"])
def test_our_phi3_template_renders_as_ollamas_own_phi3(messages, want):
    assert render(OLLAMA_PHI3, messages) == want  # the expectation is Ollama's own rendering
    ours, _ = family_spec("phi3")  # modelfiles/phi3.Modelfile
    assert render(ours, messages) == want


def test_two_processes_building_at_once_both_get_a_whole_oracle_and_a_third_builds_nothing(tmp_path):
    code = "import gotemplate; print(gotemplate.binary()); print(gotemplate.render('{{ 1 }}', []))"
    env = {**os.environ, "AGIASI_CACHE_DIR": str(tmp_path)}

    def start():
        return subprocess.Popen([sys.executable, "-c", code], cwd=REPO / "tests", env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    builds = [start(), start()]
    outputs = [b.communicate(timeout=300) for b in builds]
    assert [b.returncode for b in builds] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0] and outputs[0][0].endswith("/gotmpl\n1\n")
    built = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert len(built) == 2 and built[1] == built[0] + "/gotmpl"  # no temporary left behind
    inode = (tmp_path / built[1]).stat().st_ino
    third = start()
    assert third.communicate(timeout=60)[0] == outputs[0][0]
    assert (tmp_path / built[1]).stat().st_ino == inode


def test_without_go_it_says_to_run_make_go(tmp_path):
    code = "import gotemplate; gotemplate.render('{{ 1 }}', [])"
    env = {**os.environ, "AGIASI_CACHE_DIR": str(tmp_path), "PATH": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests", env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "RuntimeError: Go is missing: run `make go`" in res.stderr
