"""A tiny, deterministic Phi-3 with a Phi-3 style tokenizer, built offline.

The demo pipeline and the tests need a base model that has the layout of the
real one (Phi3ForCausalLM, a SentencePiece BPE tokenizer with Phi-3's special
tokens, Phi-3.5's chat template) but trains and converts in seconds on a CPU.
Everything here is generated in code from fixed seeds, so two builds give
byte-identical folders and nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

from .artifacts import atomic_dir

# Pieces in the SentencePiece model: 3 specials, 256 byte pieces, ~220 characters, ~290 merged pieces.
SPM_VOCAB_SIZE = 768
# The corpus is fixed, independent of the weight seed, so every variant shares one tokenizer.
CORPUS_SEED = 1618
CORPUS_LINES = 3000
# Target standard deviation of the logits at init; std 0.02 weights give nearly flat ones.
LOGIT_STD = 4.0

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
ENDOFTEXT, END, USER, ASSISTANT, SYSTEM = "<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"
# Phi-3's added tokens, in Phi-3's order, right after the SentencePiece vocab (32000..32010 there).
PHI3_ADDED_TOKENS = (
    ENDOFTEXT,
    ASSISTANT,
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    SYSTEM,
    END,
    "<|placeholder5|>",
    "<|placeholder6|>",
    USER,
)
# Phi-3.5-mini-instruct's chat template, verbatim.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|assistant|>\n' }}"
    "{% else %}"
    "{{ eos_token }}"
    "{% endif %}"
)
MODEL_MAX_LENGTH = 4096

_JA_PEOPLE = ["私", "わたし", "先生", "友達", "母", "父", "子供たち", "田中さん", "佐藤さん", "山田さん", "学生", "家族"]
_JA_PLACES = ["東京", "京都", "大阪", "北海道", "学校", "駅", "公園", "図書館", "海", "山", "町", "日本", "カフェ", "ホテル"]
_JA_FOODS = ["ご飯", "お茶", "パン", "りんご", "みそ汁", "すし", "ラーメン", "カレー", "コーヒー", "ケーキ", "野菜", "魚"]
_JA_THINGS = ["本", "花", "空", "水", "音楽", "映画", "手紙", "写真", "地図", "時計", "テレビ", "コンピューター", "カメラ"]
_JA_ADJ = ["きれい", "静か", "元気", "大切", "便利", "有名", "親切", "大好き"]
_JA_IADJ = ["おいしい", "楽しい", "美しい", "新しい", "やさしい", "明るい", "大きい", "小さい", "暖かい", "面白い"]
_JA_TIMES = ["今日", "明日", "昨日", "毎朝", "週末", "夜", "春", "夏", "秋", "冬", "午後"]
_JA_VERBS = ["食べます", "飲みます", "読みます", "見ます", "作ります", "書きます", "買います", "使います"]
_JA_TEMPLATES = [
    "{time}は{place}へ行きます。",
    "{person}は{place}で{food}を食べました。",
    "{time}、{person}と{thing}を見ました。",
    "この{thing}はとても{iadj}です。",
    "{place}はとても{adj}な所です。",
    "{person}は毎日{food}を{verb}。",
    "こんにちは、{person}。お元気ですか？",
    "ありがとうございます。{time}もよろしくお願いします。",
    "すみません、{place}はどこですか？",
    "{num}時に{place}で会いましょう。",
    "{food}を{num}つください。",
    "{thing}について教えてください。",
    "はい、わかりました。{thing}を{verb}。",
    "{person}の{thing}は{iadj}ですね。",
    "黄金比は約1.618です。{thing}にも使われています。",
    "{place}の天気は{iadj}です。{time}は晴れるでしょう。",
    "ユーザー：{thing}はどうですか？\nアシスタント：とても{iadj}と思います。",
    "「{food}が{iadj}ですね」と{person}は言いました。",
    "カタカナの言葉：{thing}、{food}、{place}。",
    "{num}年に{place}で生まれました。",
]
_EN_SUBJECTS = ["I", "We", "The teacher", "My friend", "The cat", "She", "He", "They", "The children", "Our team"]
_EN_VERBS = ["like", "read", "make", "see", "find", "love", "need", "want", "bring", "share"]
_EN_OBJECTS = ["tea", "books", "music", "the map", "a letter", "fresh bread", "the garden", "a new idea", "the answer", "flowers"]
_EN_PLACES = ["Tokyo", "the park", "the library", "the station", "the sea", "the mountains", "school", "home", "Kyoto"]
_EN_ADJ = ["kind", "quiet", "bright", "simple", "warm", "useful", "beautiful", "golden", "happy", "careful"]
_EN_TEMPLATES = [
    "{subj} {verb} {obj} in {place}.",
    "Hello! How are you today?",
    "Thank you for your help with {obj}.",
    "{subj} went to {place} at {num} o'clock.",
    "The golden ratio is about 1.618, and it appears in {obj}.",
    "Could you tell me about {obj}, please?",
    "It is a {adj} day in {place}.",
    "User: What is {obj}?\nAssistant: It is {adj} and {adj2}.",
    "There are {num} {adj} things in {place}.",
    "  {subj} said, \"{adj} people make {place} {adj2}.\"",
    "Step {num}: {verb} {obj} and keep it {adj}.",
    "In {num}, {subj} {verb} {obj}.",
]


def _training_corpus() -> list[str]:
    """Japanese and English sentences, generated from a fixed seed (no files read)."""
    rng = random.Random(CORPUS_SEED)
    lines = []
    for i in range(CORPUS_LINES):
        if i % 3 == 2:
            line = rng.choice(_EN_TEMPLATES).format(
                subj=rng.choice(_EN_SUBJECTS),
                verb=rng.choice(_EN_VERBS),
                obj=rng.choice(_EN_OBJECTS),
                place=rng.choice(_EN_PLACES),
                adj=rng.choice(_EN_ADJ),
                adj2=rng.choice(_EN_ADJ),
                num=rng.randint(1, 2025),
            )
        else:
            line = rng.choice(_JA_TEMPLATES).format(
                person=rng.choice(_JA_PEOPLE),
                place=rng.choice(_JA_PLACES),
                food=rng.choice(_JA_FOODS),
                thing=rng.choice(_JA_THINGS),
                adj=rng.choice(_JA_ADJ),
                iadj=rng.choice(_JA_IADJ),
                time=rng.choice(_JA_TIMES),
                verb=rng.choice(_JA_VERBS),
                num=rng.randint(1, 12),
            )
        lines.append(line)
    return lines


def _train_sentencepiece() -> bytes:
    """Train a SentencePiece BPE model with Llama-2's settings; returns the serialized model.

    Byte fallback, no normalization, whitespace kept as is, a dummy prefix and single-digit
    pieces; unk/bos/eos are ids 0/1/2 and there is no pad piece, as in Llama-2 and Phi-3.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=SPM_VOCAB_SIZE,
        character_coverage=0.995,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # One thread and no shuffling: the same corpus gives the same bytes.
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _bpe_vocab_and_merges(sp: spm.SentencePieceProcessor) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The SentencePiece vocab and the BPE merges that reproduce its segmentation.

    SentencePiece BPE merges the adjacent pair whose union has the best score;
    a merge list ranked by the score of the merged piece does the same.
    """
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ranked = []
    for piece, piece_id in vocab.items():
        if sp.is_control(piece_id) or sp.is_unknown(piece_id) or sp.is_byte(piece_id):
            continue
        score = sp.get_score(piece_id)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return vocab, [(left, right) for _, _, _, left, right in ranked]


def _added_token_flags(content: str) -> dict:
    """Phi-3.5's flags: every special token strips whitespace on its right except <unk>, <s>, <|endoftext|>."""
    return {
        "lstrip": False,
        "normalized": False,
        "rstrip": content not in (UNK, BOS, ENDOFTEXT),
        "single_word": False,
        "special": content != EOS,
    }


def _fast_tokenizer(sp: spm.SentencePieceProcessor) -> Tokenizer:
    """tokenizer.json in Phi-3's layout: normalizer adds the dummy prefix, no pre-tokenizer, BOS added."""
    vocab, merges = _bpe_vocab_and_merges(sp)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    # Ids 0..2 already exist in the vocab; the Phi-3 tokens are appended in order after it.
    for content in (UNK, BOS, EOS, *PHI3_ADDED_TOKENS):
        flags = _added_token_flags(content)
        token = AddedToken(content, **flags)
        if flags["special"]:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    return tokenizer


def _tokenizer_config(added_tokens: dict[int, str]) -> dict:
    """tokenizer_config.json as Phi-3.5-mini-instruct has it, except add_bos_token and model_max_length."""
    return {
        # Phi-3.5's file says false (no BOS from HF). True here: HF puts <s> first, and so does llama.cpp,
        # whose tokenizer.ggml.add_bos_token the converter takes from this key.
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {"content": t, **_added_token_flags(t)} for i, t in added_tokens.items()},
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": ENDOFTEXT,
        "legacy": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": ENDOFTEXT,
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": UNK,
        "use_default_system_prompt": False,
    }


def _special_tokens_map() -> dict:
    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {"bos_token": entry(BOS), "eos_token": entry(ENDOFTEXT), "pad_token": entry(ENDOFTEXT), "unk_token": entry(UNK)}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(folder: Path) -> dict[str, int]:
    """Writes every tokenizer file into folder; returns the ids of the special tokens."""
    sp_model = _train_sentencepiece()
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    tokenizer = _fast_tokenizer(sp)
    (folder / "tokenizer.model").write_bytes(sp_model)
    tokenizer.save(str(folder / "tokenizer.json"), pretty=True)
    ids = {t: tokenizer.token_to_id(t) for t in (UNK, BOS, EOS, *PHI3_ADDED_TOKENS)}
    _write_json(folder / "tokenizer_config.json", _tokenizer_config({i: t for t, i in ids.items()}))
    _write_json(folder / "special_tokens_map.json", _special_tokens_map())
    (folder / "chat_template.jinja").write_text(PHI3_CHAT_TEMPLATE, encoding="utf-8")
    return ids


def _padded_vocab_size(n_tokens: int, multiple: int = 64) -> int:
    return -(-n_tokens // multiple) * multiple


def _write_model(
    folder: Path,
    ids: dict[str, int],
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    tie_word_embeddings: bool,
    seed: int,
) -> None:
    """Writes config.json, generation_config.json and model.safetensors (float32) into folder."""
    config = Phi3Config(
        vocab_size=_padded_vocab_size(SPM_VOCAB_SIZE + len(PHI3_ADDED_TOKENS)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        original_max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids[BOS],
        eos_token_id=ids[ENDOFTEXT],
        pad_token_id=ids[ENDOFTEXT],
        dtype="float32",
    )
    # A private RNG stream: the caller's torch random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(config).to(torch.float32)
        # The final RMSNorm gives unit-RMS hidden states, so head rows of std LOGIT_STD / sqrt(hidden)
        # give logits of std ~LOGIT_STD. Embeddings get the same scale so that the tied variant matches.
        std = LOGIT_STD / hidden_size**0.5
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, std)
            if not tie_word_embeddings:
                model.lm_head.weight.normal_(0.0, std)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=[ids[END], ids[ASSISTANT], ids[ENDOFTEXT]],
        pad_token_id=ids[ENDOFTEXT],
    )
    model.save_pretrained(folder)


def build_tiny_phi3(
    out_dir: Path,
    *,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_layers: int = 2,
    num_heads: int = 4,
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Build a tiny random Phi-3 model folder with a Phi-3 style tokenizer, offline and deterministically.

    Inputs: out_dir, the folder to create (its parent is created if missing; an existing out_dir is replaced,
    but only once the new folder is complete); the model shape (hidden_size must be a multiple of num_heads);
    tie_word_embeddings, whether lm_head shares the embedding matrix; seed, the torch seed of the weights.
    The tokenizer does not depend on any argument.

    Outputs: out_dir, holding config.json, generation_config.json, model.safetensors (float32),
    tokenizer.model (SentencePiece BPE, 768 pieces), tokenizer.json, tokenizer_config.json,
    special_tokens_map.json and chat_template.jinja, loadable offline with AutoModelForCausalLM and
    AutoTokenizer and convertible by llama.cpp's convert_hf_to_gguf.py. The same arguments give
    byte-identical files.

    Errors: ValueError for a shape that does not divide into heads or a non-positive size; OSError when
    out_dir cannot be written. On any error out_dir is left as it was.
    """
    if min(hidden_size, intermediate_size, num_layers, num_heads) <= 0:
        raise ValueError("hidden_size, intermediate_size, num_layers and num_heads must be positive")
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} heads of even size")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as staging:
        ids = _write_tokenizer(staging)
        _write_model(
            staging,
            ids,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            tie_word_embeddings=tie_word_embeddings,
            seed=seed,
        )
    return out_dir

