// Command gotmpl is the tests' template oracle (tests/gotemplate.py builds and runs it): it
// renders an Ollama TEMPLATE for a chat with Go's own text/template, the way Ollama v0.33.0-rc2
// (commit fb30760) does for /api/chat. Each rule below names the Ollama file and function it
// copies; Ollama's own types are replaced by the few fields a chat template can see.
//
// stdin, one JSON request:
//
//	{"template": str, "messages": [{"role", "content", "thinking"?, "tool_calls"?, "tool_name"?,
//	 "tool_call_id"?}], "tools"?: [...], "think"?: bool | "high" | "medium" | "low" | "max",
//	 "parse_only"?: bool}
//
// stdout, one JSON answer: {"rendered": str}, or {"error": str} with the error as Go prints it,
// from Parse (what server/create.go setTemplate wraps as "template error: <err>") or from
// Execute (what ChatHandler answers with 500). With parse_only, only Parse runs (rendered is "").
// A request that cannot be decoded exits 2 with the reason on stderr.
//
// Left out of Ollama's path to the prompt, on purpose:
//   - images: server/prompt.go imageTaggedMessages ([img-N] tags) is not done; "images" is refused;
//   - server/prompt.go chatPrompt's truncation to num_ctx: the whole conversation is rendered;
//   - template/template.go Execute's Prompt+Suffix path (only /api/generate with a suffix uses it);
//   - a tool property's own nested "properties" stays the request's JSON text, where Ollama
//     decodes it into an ordered map of api.ToolProperty (same JSON unless it has unknown keys);
//   - what ChatHandler (server/routes.go) does before chatPrompt is the caller's: the model's
//     SYSTEM put first, filterThinkTags (qwen3, deepseek-r1), a model's Go renderer or harmony.
//
// Written for Debian's Go 1.19 (Ollama builds with 1.26): no slices/maps packages, and the
// template language is 1.19's (no range over an integer or a function, added in 1.22/1.23).
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

type request struct {
	Template  string          `json:"template"`
	Messages  []message       `json:"messages"`
	Tools     templateTools   `json:"tools"`
	Think     json.RawMessage `json:"think"`
	ParseOnly bool            `json:"parse_only"`
}

// message is api/types.go Message without Images.
type message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking"`
	ToolCalls  []toolCall `json:"tool_calls"`
	ToolName   string     `json:"tool_name"`
	ToolCallID string     `json:"tool_call_id"`
}

// api/types.go Message.UnmarshalJSON: the role is lower-cased.
func (m *message) UnmarshalJSON(b []byte) error {
	type plain message
	var p plain
	if err := strict(b, &p); err != nil {
		return err
	}
	*m = message(p)
	m.Role = strings.ToLower(m.Role)
	return nil
}

// toolCall is api/types.go ToolCall; its Arguments (an ordered map there) are only ever seen
// by a template as template/template.go's templateArgs, a plain map.
type toolCall struct {
	ID       string `json:"id"`
	Function struct {
		Index     int            `json:"index"`
		Name      string         `json:"name"`
		Arguments map[string]any `json:"arguments"`
	} `json:"function"`
}

// ---- template/template.go: what a template sees -------------------------------------------

var funcs = template.FuncMap{ // template/template.go funcs
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
	"toTypeScriptType": func(v any) string {
		if param, ok := v.(toolProperty); ok {
			return param.toTypeScriptType()
		}
		if param, ok := v.(*toolProperty); ok && param != nil {
			return param.toTypeScriptType()
		}
		return "any"
	},
}

// The request's tools are decoded straight into template/template.go's templateTool types,
// which is what its convertToolsForTemplate makes of api.Tools (same JSON keys).
type templateTools []templateTool

func (t templateTools) String() string { return marshal(t) }

type templateTool struct {
	Type     string               `json:"type"`
	Items    any                  `json:"items,omitempty"`
	Function templateToolFunction `json:"function"`
}

func (t templateTool) String() string { return marshal(t) }

type templateToolFunction struct {
	Name        string                         `json:"name"`
	Description string                         `json:"description"`
	Parameters  templateToolFunctionParameters `json:"parameters"`
}

type templateToolFunctionParameters struct {
	Type       string             `json:"type"`
	Defs       any                `json:"$defs,omitempty"`
	Items      any                `json:"items,omitempty"`
	Required   []string           `json:"required,omitempty"`
	Properties templateProperties `json:"properties"`
}

type templateProperties map[string]toolProperty

func (t templateProperties) String() string {
	if t == nil {
		return "{}"
	}
	return marshal(t)
}

type templateArgs map[string]any

func (t templateArgs) String() string {
	if t == nil {
		return "{}"
	}
	return marshal(t)
}

type templateToolCall struct {
	ID       string
	Function templateToolCallFunction
}

type templateToolCallFunction struct {
	Index     int
	Name      string
	Arguments templateArgs
}

type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []struct{} // always empty: images are refused (see the top)
	ToolCalls  []templateToolCall
	ToolName   string
	ToolCallID string
}

// convertMessagesForTemplate (template/template.go).
func convertMessagesForTemplate(messages []*message) []*templateMessage {
	if messages == nil {
		return nil
	}
	result := make([]*templateMessage, len(messages))
	for i, msg := range messages {
		var toolCalls []templateToolCall
		for _, tc := range msg.ToolCalls {
			toolCalls = append(toolCalls, templateToolCall{ID: tc.ID, Function: templateToolCallFunction{
				Index: tc.Function.Index, Name: tc.Function.Name, Arguments: templateArgs(tc.Function.Arguments)}})
		}
		result[i] = &templateMessage{Role: msg.Role, Content: msg.Content, Thinking: msg.Thinking,
			ToolCalls: toolCalls, ToolName: msg.ToolName, ToolCallID: msg.ToolCallID}
	}
	return result
}

// toolProperty is api/types.go ToolProperty (Properties kept as JSON text, see the top).
type toolProperty struct {
	AnyOf       []toolProperty  `json:"anyOf,omitempty"`
	Type        propertyType    `json:"type,omitempty"`
	Items       any             `json:"items,omitempty"`
	Description string          `json:"description,omitempty"`
	Enum        []any           `json:"enum,omitempty"`
	Properties  json.RawMessage `json:"properties,omitempty"`
	Required    []string        `json:"required,omitempty"`
}

// api/types.go ToolProperty.ToTypeScriptType and mapToTypeScriptType.
func (tp toolProperty) toTypeScriptType() string {
	var types []string
	if len(tp.AnyOf) > 0 {
		for _, anyOf := range tp.AnyOf {
			types = append(types, anyOf.toTypeScriptType())
		}
		return strings.Join(types, " | ")
	}
	if len(tp.Type) == 0 {
		return "any"
	}
	for _, t := range tp.Type {
		switch t {
		case "string", "boolean", "null":
			types = append(types, t)
		case "number", "integer":
			types = append(types, "number")
		case "array":
			types = append(types, "any[]")
		case "object":
			types = append(types, "Record<string, any>")
		default:
			types = append(types, "any")
		}
	}
	return strings.Join(types, " | ")
}

// propertyType is api/types.go PropertyType: a string or a list of strings.
type propertyType []string

func (pt *propertyType) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err == nil {
		*pt = []string{s}
		return nil
	}
	var a []string
	if err := json.Unmarshal(data, &a); err != nil {
		return err
	}
	*pt = a
	return nil
}

func (pt propertyType) MarshalJSON() ([]byte, error) {
	if len(pt) == 1 {
		return json.Marshal(pt[0])
	}
	return json.Marshal([]string(pt))
}

func (pt propertyType) String() string {
	if len(pt) == 0 {
		return ""
	}
	if len(pt) == 1 {
		return pt[0]
	}
	return fmt.Sprintf("%v", []string(pt))
}

// ---- template/template.go: Parse, Vars, Execute --------------------------------------------

// response is template/template.go's {{ .Response }} node, added to templates that lack one.
var response = parse.ActionNode{
	NodeType: parse.NodeAction,
	Pipe: &parse.PipeNode{NodeType: parse.NodePipe, Cmds: []*parse.CommandNode{{
		NodeType: parse.NodeCommand,
		Args:     []parse.Node{&parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}},
	}}},
}

// Parse (template/template.go): missingkey=zero, Ollama's funcs, and {{ .Response }} appended
// when the template uses neither .Messages nor .Response.
func Parse(s string) (*template.Template, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(s)
	if err != nil {
		return nil, err
	}
	vars, err := Vars(tmpl)
	if err != nil {
		return nil, err
	}
	if !contains(vars, "messages") && !contains(vars, "response") {
		tmpl.Tree.Root.Nodes = append(tmpl.Tree.Root.Nodes, &response)
	}
	return tmpl, nil
}

// Vars (template/template.go Template.Vars): every identifier of every defined template,
// lower-cased, sorted, without duplicates.
func Vars(t *template.Template) ([]string, error) {
	set := map[string]bool{}
	for _, tt := range t.Templates() {
		for _, n := range tt.Root.Nodes {
			v, err := Identifiers(n)
			for _, name := range v {
				set[strings.ToLower(name)] = true
			}
			if err != nil {
				return nil, err
			}
		}
	}
	vars := make([]string, 0, len(set))
	for name := range set {
		vars = append(vars, name)
	}
	sort.Strings(vars)
	return vars, nil
}

// Identifiers (template/template.go): the field and variable names a node uses.
func Identifiers(n parse.Node) ([]string, error) {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, n := range n.Nodes {
			i, err := Identifiers(n)
			if err != nil {
				return names, err
			}
			names = append(names, i...)
		}
		return names, nil
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined template specified")
		}
		return Identifiers(n.Pipe)
	case *parse.ActionNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined action in template")
		}
		return Identifiers(n.Pipe)
	case *parse.BranchNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined branch")
		}
		names, err := Identifiers(n.Pipe)
		if err != nil {
			return names, err
		}
		for _, n := range []*parse.ListNode{n.List, n.ElseList} {
			if n != nil {
				i, err := Identifiers(n)
				if err != nil {
					return names, err
				}
				names = append(names, i...)
			}
		}
		return names, nil
	case *parse.IfNode:
		return Identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return Identifiers(&n.BranchNode)
	case *parse.WithNode:
		return Identifiers(&n.BranchNode)
	case *parse.PipeNode:
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				i, err := Identifiers(a)
				if err != nil {
					return names, err
				}
				names = append(names, i...)
			}
		}
		return names, nil
	case *parse.FieldNode:
		return n.Ident, nil
	case *parse.VariableNode:
		return n.Ident, nil
	}
	return nil, nil
}

// Execute (template/template.go Template.Execute), less its Prompt+Suffix path. A template
// that uses .Messages gets the collated messages; any other is run once per exchange with
// .System/.Prompt/.Response, and the last time only up to its {{ .Response }}.
func Execute(t *template.Template, w io.Writer, msgs []message, tools templateTools, think, thinkSet bool, thinkLevel string) error {
	system, messages := collate(msgs)
	vars, err := Vars(t)
	if err != nil {
		return err
	}
	if contains(vars, "messages") {
		return t.Execute(w, map[string]any{
			"System":     system,
			"Messages":   convertMessagesForTemplate(messages),
			"Tools":      tools,
			"Response":   "",
			"Think":      think,
			"ThinkLevel": thinkLevel,
			"IsThinkSet": thinkSet,
		})
	}

	system = ""
	var b bytes.Buffer
	var prompt, response string
	values := func() map[string]any {
		return map[string]any{"System": system, "Prompt": prompt, "Response": response,
			"Think": think, "ThinkLevel": thinkLevel, "IsThinkSet": thinkSet}
	}
	execute := func() error {
		if err := t.Execute(&b, values()); err != nil {
			return err
		}
		system, prompt, response = "", "", ""
		return nil
	}
	for _, m := range messages {
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := execute(); err != nil {
					return err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := execute(); err != nil {
					return err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}

	// The last exchange: everything from the first node that uses .Response on is cut, and the
	// rest runs as a new template (without Ollama's funcs, as Ollama's does).
	var cut bool
	nodes := deleteNode(t.Root.Copy(), func(n parse.Node) bool {
		if field, ok := n.(*parse.FieldNode); ok && contains(field.Ident, "Response") {
			cut = true
			return false
		}
		return cut
	})
	tree := parse.Tree{Root: nodes.(*parse.ListNode)}
	if err := template.Must(template.New("").AddParseTree("", &tree)).Execute(&b, values()); err != nil {
		return err
	}
	_, err = io.Copy(w, &b)
	return err
}

// collate (template/template.go): all system messages' contents joined by "\n\n" become
// .System (the system messages also stay in the list), and a message whose role is the same
// as the one before it (tool results excepted) is appended to it after "\n\n".
func collate(msgs []message) (string, []*message) {
	var system []string
	var collated []*message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

// deleteNode (template/template.go): the tree without the nodes fn picks.
func deleteNode(n parse.Node, fn func(parse.Node) bool) parse.Node {
	var walk func(n parse.Node) parse.Node
	walk = func(n parse.Node) parse.Node {
		if fn(n) {
			return nil
		}
		switch t := n.(type) {
		case *parse.ListNode:
			var nodes []parse.Node
			for _, c := range t.Nodes {
				if n := walk(c); n != nil {
					nodes = append(nodes, n)
				}
			}
			t.Nodes = nodes
			return t
		case *parse.IfNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.WithNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.RangeNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.BranchNode:
			t.List = walk(t.List).(*parse.ListNode)
			if t.ElseList != nil {
				t.ElseList = walk(t.ElseList).(*parse.ListNode)
			}
		case *parse.ActionNode:
			n := walk(t.Pipe)
			if n == nil {
				return nil
			}
			t.Pipe = n.(*parse.PipeNode)
		case *parse.PipeNode:
			var commands []*parse.CommandNode
			for _, c := range t.Cmds {
				var args []parse.Node
				for _, a := range c.Args {
					if n := walk(a); n != nil {
						args = append(args, n)
					}
				}
				if len(args) == 0 {
					return nil
				}
				c.Args = args
				commands = append(commands, c)
			}
			if len(commands) == 0 {
				return nil
			}
			t.Cmds = commands
		}
		return n
	}
	return walk(n)
}

// thinkValues is api/types.go ThinkValue (UnmarshalJSON, Bool, String) as server/prompt.go
// renderPrompt reads it: Think, ThinkLevel (true alone is "medium") and IsThinkSet.
func thinkValues(raw json.RawMessage) (think bool, level string, set bool, err error) {
	if len(raw) == 0 || string(raw) == "null" {
		return false, "", false, nil
	}
	var b bool
	if json.Unmarshal(raw, &b) == nil {
		if b {
			return true, "medium", true, nil
		}
		return false, "", true, nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		if s != "high" && s != "medium" && s != "low" && s != "max" {
			return false, "", false, fmt.Errorf("invalid think value: %q (must be \"high\", \"medium\", \"low\", \"max\", true, or false)", s)
		}
		return true, s, true, nil
	}
	return false, "", false, errors.New("think must be a boolean or string (\"high\", \"medium\", \"low\", \"max\", true, or false)")
}

// ---- the oracle's own plumbing ---------------------------------------------------------------

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

func marshal(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// strict decodes JSON and refuses keys the oracle does not know (such as "images").
func strict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	return dec.Decode(v)
}

func answer(key, value string) {
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(map[string]string{key: value}); err != nil {
		fmt.Fprintln(os.Stderr, "gotmpl:", err)
		os.Exit(1)
	}
}

func main() {
	input, err := io.ReadAll(os.Stdin)
	var req request
	if err == nil {
		err = strict(input, &req)
	}
	var think, thinkSet bool
	var thinkLevel string
	if err == nil {
		think, thinkLevel, thinkSet, err = thinkValues(req.Think)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "gotmpl: bad request:", err)
		os.Exit(2)
	}

	tmpl, err := Parse(req.Template)
	if err != nil {
		answer("error", err.Error())
		return
	}
	var b bytes.Buffer
	if !req.ParseOnly {
		if err := Execute(tmpl, &b, req.Messages, req.Tools, think, thinkSet, thinkLevel); err != nil {
			answer("error", err.Error())
			return
		}
	}
	answer("rendered", b.String())
}
