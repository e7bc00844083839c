"""The family registry: which bases are supported, refused and why, and that the parts of the
pipeline that compute a model by itself (the layer-by-layer gate, fuse's config) follow each
family's own transformers code, on random models of each family's real config shape."""
from __future__ import annotations

import numpy as np
import yaml
import pytest
import torch

from conftest import small_config, write_config
from pipeline import families
from pipeline.config import check_base_architecture, load_config, lora_targets, modelfile_family
from pipeline.families import FAMILIES, UnsupportedBaseError, family_of, gguf_name
from pipeline.fidelity import compare, hf_logits
from pipeline.fuse import fused_config
from pipeline.layered import Variant, layered_logits
from pipeline.soul import SO8Soul, fold_soul_into_head

# Each family's config keys that change its computation, after a named real model's config.json,
# scaled down (2..3 layers, hidden 64): what the layer-by-layer gate must reproduce.
SHAPES = {
    # Llama-3.2-1B-Instruct: llama3 rope scaling (scaled frequencies), rope_theta 500000, tied.
    "llama3": dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                   rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
                   rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                   tie_word_embeddings=True),
    # Qwen2.5-0.5B-Instruct: biases on q/k/v, tied.
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                  rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # Qwen3-0.6B: per-head q/k RMSNorm, head_dim independent of hidden_size, tied.
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512,
                  rope_theta=1000000.0, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True),
    # Gemma-3-1b-it: scaled embeddings, (1 + w) norms, sliding-window layers with their own rope base,
    # query_pre_attn_scalar; a final logit softcap here (Gemma-2's 30.0) to prove the gate applies one.
    "gemma3": dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=64,
                   intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                   head_dim=16, vocab_size=512, query_pre_attn_scalar=16, sliding_window=4,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                   rope_theta=1000000.0, rope_local_base_freq=10000.0, final_logit_softcapping=30.0,
                   max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def random_model(folder, shape: dict, *, tied: bool, seed: int = 0):
    """A random model of the shape, saved in float32; logits of std ~4 so comparisons can fail."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(shape["model_type"], **{k: v for k, v in shape.items() if k != "model_type"})
    config.tie_word_embeddings = tied
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:  # norms and biases away from their init, so a misplaced one shows
                    p.add_(torch.randn_like(p) * 0.1)
            model.model.embed_tokens.weight.normal_(0.0, 0.5)
            if not tied:
                model.lm_head.weight.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    return folder


PROMPTS = [[1, 5, 9, 200, 3, 7, 7, 300, 41, 8, 2], [4, 4, 100, 17]]


@pytest.fixture(scope="module", params=[(f, t) for f in SHAPES for t in (True, False) if not (f == "gemma3" and not t)],
                ids=lambda p: f"{p[0]}-{'tied' if p[1] else 'untied'}")
def family_model(request, tmp_path_factory):
    name, tied = request.param
    folder = tmp_path_factory.mktemp(name) / "m"
    return name, random_model(folder, SHAPES[name], tied=tied)


def whole_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def test_each_family_is_computed_layer_by_layer_as_transformers_computes_it(family_model):
    name, folder = family_model
    layered = layered_logits(folder, PROMPTS, {"m": Variant()})["m"]
    whole = hf_logits(whole_model(folder), PROMPTS)
    for a, b in zip(layered, whole):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert compare(whole, layered).kl < 1e-10
    # The comparison can fail: the same model without its family's scaled embeddings or with another
    # prompt differs (a gate that ignores Gemma's embed scale would pass nothing here).
    other = layered_logits(folder, [p[::-1] for p in PROMPTS], {"m": Variant()})["m"]
    assert compare(whole, other).max_abs > 1.0


def test_the_soul_in_front_of_the_head_is_what_a_folded_head_computes(family_model):
    """The layer-by-layer trained model (soul before the head) equals the folded head W + s W R,
    softcap included, for every family: what fuse writes is what training ran."""
    from pipeline.adapter import HEAD
    from pipeline.layered import stored_weight

    name, folder = family_model
    torch.manual_seed(1)
    soul = SO8Soul(SHAPES[name]["hidden_size"], alpha=0.7)
    with torch.no_grad():
        soul.generator.normal_(0.0, 0.5)
    rotation = soul.rotation().detach()

    def folded(n, w):
        w = stored_weight(n, w)
        return fold_soul_into_head(w, rotation, 0.7) if n == HEAD else w

    out = layered_logits(folder, PROMPTS, {"soul": Variant(soul=soul), "folded": Variant(weight=folded),
                                           "plain": Variant()})
    assert compare(out["soul"], out["folded"]).kl < 1e-9
    assert compare(out["soul"], out["plain"]).max_abs > 1.0


@pytest.mark.parametrize("name", SHAPES)
def test_family_comes_from_config_json_never_from_a_name(name):
    shape = SHAPES[name]
    assert family_of(shape).name == name
    assert family_of({"model_type": shape["model_type"]}).name == name  # an old config without architectures
    fused = fused_config({**shape, "architectures": shape["architectures"], "auto_map": {"x": "y"}}, "float16")
    assert fused["architectures"] == shape["architectures"] and "auto_map" not in fused
    assert fused["tie_word_embeddings"] is False


def test_gemma2_and_unknown_architectures_are_refused_with_the_reason():
    with pytest.raises(UnsupportedBaseError, match="drops lm_head.weight"):
        family_of({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"})
    with pytest.raises(UnsupportedBaseError) as err:
        family_of({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    for f in families.supported():
        assert f.architectures[0] in str(err.value)
    problems = check_base_architecture({"architectures": ["Gemma2ForCausalLM"], "hidden_size": 64}, "x/config.json")
    assert problems and "x/config.json" in problems[0] and "Gemma-2" in problems[0]


def test_phi3_names_its_gguf_as_llama_cpp_wants_and_others_keep_theirs():
    phi3, qwen3 = families.BY_NAME["phi3"], families.BY_NAME["qwen3"]
    assert gguf_name(phi3, "demo", None) == "demo-phi3"
    assert gguf_name(phi3, "my-phi-3", None) == "my-phi-3"
    with pytest.raises(ValueError, match="phi"):
        gguf_name(phi3, "demo", "soul-fusion")
    assert gguf_name(qwen3, "demo", None) == "demo"


def test_every_supported_family_has_a_modelfile_and_lora_targets():
    from pipeline.modelfiles import MODELFILES

    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names)
    for f in families.supported():
        assert (MODELFILES / f"{f.modelfile}.Modelfile").is_file(), f.name
        assert f.lora_targets


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_lora_targets_and_chat_format_default_to_the_base_family(tmp_path, name):
    base = random_model(tmp_path / "base", SHAPES[name], tied=True)
    (base / "tokenizer.json").write_text("{}")  # check-config's folder check wants a tokenizer file
    cfg = load_config(write_config(tmp_path / "c.yaml", small_config(base, tmp_path / "b")))
    assert lora_targets(cfg) == list(families.SPLIT_PROJECTIONS)
    assert modelfile_family(cfg) == families.BY_NAME[name].modelfile
    cfg = load_config(write_config(tmp_path / "d.yaml", small_config(
        base, tmp_path / "b", train={"lora": {"target_modules": ["q_proj"]}}, ollama={"family": "phi3"})))
    assert lora_targets(cfg) == ["q_proj"] and modelfile_family(cfg) == "phi3"


def test_the_demo_config_of_another_family_is_demo_yaml_on_its_tiny_model(tmp_path):
    """`make demo FAMILY=qwen3` runs demo.yaml's settings on the tiny Qwen3, in a run of its own:
    every path still names what demo.yaml's names, and the family comes from the base."""
    from conftest import REPO
    from pipeline.demo import demo_config
    from pipeline.errors import BadInputError

    base = random_model(tmp_path / "tiny-qwen3", SHAPES["qwen3"], tied=True)
    (base / "tokenizer.json").write_text("{}")
    out = demo_config(REPO / "demo.yaml", "qwen3", base, tmp_path / "build" / "demo-qwen3.yaml")
    demo = yaml.safe_load((REPO / "demo.yaml").read_text(encoding="utf-8"))  # its base may not be built yet
    derived = load_config(out)
    assert derived.run.name == "demo-qwen3" and derived.ollama.model == f"{demo['ollama']['model']}-qwen3"
    assert derived.resolve(derived.model.base).resolve() == base.resolve()
    assert derived.local_data_files() == [(REPO / s["path"]).resolve() for s in demo["data"]["train"]]
    assert derived.heldout_path.resolve() == (REPO / demo["eval"]["heldout"]).resolve()
    assert derived.imatrix_calibration.resolve() == (REPO / demo["gguf"]["imatrix"]["calibration"]).resolve()
    assert derived.run_dir.resolve() == (REPO / demo["run"]["build_dir"] / "demo-qwen3").resolve()
    assert derived.train.steps == demo["train"]["steps"] and modelfile_family(derived) == "qwen3"
    assert str(tmp_path) not in out.read_text()  # relative paths only
    with pytest.raises(BadInputError, match="supported: phi3, llama3"):
        demo_config(REPO / "demo.yaml", "gemma2", base, tmp_path / "x.yaml")
