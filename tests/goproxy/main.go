// goproxy: the proxy Go's net/http would use for one URL, under this process's environment.
//
// Ollama's client is http.DefaultClient (api/client.go), whose transport asks
// http.ProxyFromEnvironment; so does every Go program. The tests compare pipeline/goproxy.py
// with this, the real thing: `goproxy URL` prints {"proxy": "<url>" or null} or {"error": "..."}.
package main

import (
	"encoding/json"
	"net/http"
	"os"
)

func main() {
	out := map[string]any{"proxy": nil}
	req, err := http.NewRequest("GET", os.Args[1], nil)
	if err == nil {
		u, perr := http.ProxyFromEnvironment(req)
		if perr != nil {
			err = perr
		} else if u != nil {
			out["proxy"] = u.String()
		}
	}
	if err != nil {
		out["error"] = err.Error()
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
