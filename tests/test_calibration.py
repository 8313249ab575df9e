"""The calibration CLI as a user meets it: own data, up-front refusals, Ctrl-C and --resume, --layer-k served.

The runs are real (SmolLM2 through transformers, small sizes); the --layer-k
file is then served by the real vLLM engine.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.engine_run import DEFAULT_MODEL, ROOT, run_engine
from tests.model_folders import sliding_window_model
from vllm_topt.calibration import calibrate
from vllm_topt.calibration.attention import CalibrationSession, set_session, topt_calibrate_attention
from vllm_topt.calibration.data import HELDOUT_EVERY, DataError, bbc_articles, user_corpus
from vllm_topt.method.rules import ToptRule
from vllm_topt.config.support import sliding_window_layers, unsupported_model_features
from vllm_topt.config.thresholds import LayerThresholds, load_threshold_file

MODEL = str(DEFAULT_MODEL)
SMALL_RUN = ["--model", MODEL, "--num-seqs", "4", "--seq-len", "512", "--heldout-seqs", "1"]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calibration.calibrate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def refusal(argv: list[str]) -> str:
    """Run the CLI in-process; it must stop with an error before loading any weights."""
    with pytest.raises(SystemExit) as stop:
        calibrate.main(argv)
    message = str(stop.value.code)
    assert message.startswith("vllm-topt-calibrate: error:"), message
    return message


@pytest.fixture(scope="module")
def user_text(tmp_path_factory) -> Path:
    """A user's own text file (BBC held-out articles as paragraphs; about 40k tokens)."""
    path = tmp_path_factory.mktemp("data") / "SOME.txt"
    path.write_text("\n\n".join(bbc_articles("heldout")[:60]))
    return path


# ------------------------------------------------------------------ data


def test_user_data_from_text_jsonl_and_folders(tmp_path, user_text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first paragraph\n\nsecond paragraph\n \n\nthird")
    (folder / "sub" / "b.md").write_text("# notes\n\nmarkdown body")
    (folder / "image.png").write_bytes(b"\x89PNG")  # not text: a folder contributes text files only
    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"text": "plain record"}) + "\n\n"
                     + json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "hello"}]}) + "\n")
    corpus = user_corpus([folder, chats], tokenizer)
    documents = ["first paragraph", "second paragraph", "third", "# notes", "markdown body", "plain record"]
    rendered = corpus.heldout + corpus.calibration
    assert corpus.heldout == ["first paragraph"] and len(rendered) == 7
    assert sorted(documents) == sorted(d for d in rendered if "<|im_start|>" not in d)
    chat = next(d for d in rendered if "<|im_start|>" in d)  # the tokenizer's chat template
    assert "<|im_start|>user\nhi<|im_end|>" in chat and "<|im_start|>assistant\nhello" in chat
    assert [f["path"] for f in corpus.files] == [str(folder / "a.txt"), str(folder / "sub" / "b.md"), str(chats)]
    assert corpus.files[2]["sha256"] == hashlib.sha256(chats.read_bytes()).hexdigest()
    assert corpus.sha256 and corpus.sha256[:16] in corpus.description and str(chats) in corpus.description

    big = user_corpus([user_text], tokenizer)
    assert len(big.heldout) == -(-(len(big.heldout) + len(big.calibration)) // HELDOUT_EVERY)


@pytest.mark.parametrize("line, expected", [
    ("not json", "chats.jsonl:2: not valid JSON"),
    ('["a list"]', "chats.jsonl:2: each line must be a JSON object"),
    ('{"messages": [{"role": "user"}]}', "chats.jsonl:2: needs a string 'text' or 'messages'"),
])
def test_bad_jsonl_line_is_named(tmp_path, line, expected):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=expected):
        user_corpus([path], tokenizer=None)


# ------------------------------------------------------------------ refusals


def test_bad_layer_k_is_refused_in_seconds_naming_the_flag(tmp_path):
    start = time.monotonic()
    proc = cli("--model", MODEL, "--layer-k", "0:2048", "--seq-len", "512", "--out", str(tmp_path / "x.json"))
    seconds = time.monotonic() - start
    assert proc.returncode != 0 and "--layer-k 0:2048" in proc.stderr and "--seq-len" in proc.stderr, proc.stderr
    assert seconds < 30, seconds
    assert not (tmp_path / "x.json").exists()


def test_every_bad_argument_is_refused_before_the_weights_load(tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(calibrate, "load_weights", no_weights)
    out = ["--model", MODEL, "--out", str(tmp_path / "x.json")]
    assert "--k 600: --seq-len 512" in refusal([*out, "--k", "600", "--seq-len", "512"])
    assert "--dense-layers: layer 30 does not exist; the model has layers 0..29" in refusal([*out, "--dense-layers", "1,30"])
    assert "--layer-k: layer 31 does not exist" in refusal([*out, "--layer-k", "31:64"])
    assert "layer 2 is in both --layer-k and --dense-layers" in refusal([*out, "--layer-k", "2:64", "--dense-layers", "2"])
    assert "--seq-len 9000 exceeds the model's max_position_embeddings 8192" in refusal([*out, "--seq-len", "9000"])
    assert "--data" in refusal([*out, "--data", str(tmp_path / "missing.txt")])
    assert "--num-seqs or --seq-len" in refusal([*out, "--data", str(ROOT / "docs" / "SPEC.md"), "--num-seqs", "50"])
    assert "is a folder" in refusal(["--model", MODEL, "--out", str(tmp_path)])
    if not torch.cuda.is_available():
        assert "--device cuda" in refusal([*out, "--device", "cuda"])
        assert "sees no CUDA device" in refusal([*out, "--device", "cuda"])
    message = refusal(["--model", str(sliding_window_model(tmp_path)), "--out", str(tmp_path / "y.json")])
    assert "TOPT does not support sliding-window attention on every layer" in message


def test_model_support_is_read_from_the_config():
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    assert unsupported_model_features(LlamaConfig()) == []
    assert unsupported_model_features(Qwen2Config(use_sliding_window=False, sliding_window=32768)) == []
    assert unsupported_model_features(MistralConfig(sliding_window=None)) == []
    assert unsupported_model_features(MistralConfig(sliding_window=4096)) == ["sliding-window attention on every layer"]
    # Gemma-3 mixes sliding-window and global layers: servable, the sliding ones on the dense kernel.
    gemma = Gemma3TextConfig(num_hidden_layers=12)
    assert unsupported_model_features(gemma) == []
    assert sliding_window_layers(gemma) == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert sliding_window_layers(MistralConfig(sliding_window=4096, num_hidden_layers=3)) == [0, 1, 2]
    assert sliding_window_layers(Qwen2Config(use_sliding_window=False, sliding_window=32768)) == []


# ------------------------------------------------------------------ chunked attention


class Layer:  # what the attention function reads of a transformers attention module
    layer_idx = 0


@pytest.mark.parametrize("mode, placement", [("collect", "post-softmax"), ("collect", "pre-softmax"),
                                             ("apply", "post-softmax"), ("topk", "pre-softmax")])
def test_row_chunks_give_the_same_statistics_as_one_chunk(mode, placement):
    B, H, H_kv, T, d = 1, 4, 2, 300, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, d, generator=gen) for h in (H, H_kv, H_kv))
    rule = ToptRule(placement=placement, sdc="exact" if placement == "pre-softmax" else "none", vmc=True, k=20)
    values = [[0.02, 0.01, 0.004]] * H if placement == "post-softmax" else [[1.0, 1.5, 2.0]] * H
    table = LayerThresholds([21, 80, 300], values, placement)

    def run(chunk_elements):
        session = CalibrationSession(1, H, T, [rule], mode=mode, tables=[table], chunk_elements=chunk_elements)
        set_session(session)
        out, _ = topt_calibrate_attention(Layer(), q, k, v, None, scaling=d**-0.5)
        set_session(None)
        return out, session

    whole, one = run(1 << 30)
    chunked, many = run(H * T * 7)  # 7 rows per chunk
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    assert many.counts == one.counts
    torch.testing.assert_close(many.value_sum, one.value_sum, rtol=1e-6, atol=1e-9)
    assert torch.equal(many.value_count, one.value_count) and torch.equal(many.kept_by_layer, one.kept_by_layer)
    if mode == "collect":
        assert int(one.value_count.sum()) == B * H * (T - rule.k)  # every row with n > k sampled once


def test_sliding_window_layers_are_dense_and_cannot_take_a_k(tmp_path, gemma_model):
    out = ["--model", str(gemma_model), "--out", str(tmp_path / "g.json")]
    assert "layer 0 has a sliding window" in refusal([*out, "--layer-k", "0:64"])
    every_global = ",".join(map(str, (5, 11, 17)))
    message = refusal([*out, "--dense-layers", every_global])
    assert "every layer would be dense (layers 5, 11, 17 (--dense-layers); 15 sliding-window layers)" in message


def test_calibration_attention_keeps_the_sliding_window(gemma_model):
    """Dense mode of the calibration attention reproduces Gemma-3's own logits past its 512-token window."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[2] + list(range(1000, 1799))])  # <bos> and 799 tokens: rows past the window
    reference = AutoModelForCausalLM.from_pretrained(gemma_model, dtype=torch.float32, attn_implementation="sdpa")
    with torch.inference_mode():  # the last rows' logits only: [T, 262k] floats would cost seconds
        expected = reference(ids, logits_to_keep=64).logits[0]
    del reference
    config, _, model = calibrate.load_model(str(gemma_model))
    rules = [ToptRule(dense=True)] * config.num_hidden_layers
    set_session(CalibrationSession(config.num_hidden_layers, config.num_attention_heads, ids.shape[1], rules,
                                   mode="dense"))
    try:
        with torch.inference_mode():
            got = model(ids, logits_to_keep=64).logits[0]
    finally:
        set_session(None)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=1e-3)


# ------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def own_data_run(tmp_path_factory, user_text):
    out = tmp_path_factory.mktemp("own") / "X.json"
    start = time.monotonic()
    proc = cli(*SMALL_RUN, "--data", str(user_text), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, time.monotonic() - start


def test_own_data_run_names_its_data(own_data_run, user_text):
    out, proc, _ = own_data_run
    file = load_threshold_file(out)
    prov = file.provenance
    assert str(user_text) in prov.data and prov.num_sequences == 4 and prov.max_seq_len == 512
    assert prov.data_files == [{"path": str(user_text), "sha256": hashlib.sha256(user_text.read_bytes()).hexdigest(),
                                "documents": prov.data_files[0]["documents"]}]
    assert prov.device == "cpu" and prov.dtype == "float32"
    heldout = prov.heldout
    assert "held-out split" in heldout["data"] and str(user_text) in heldout["data"]
    assert 0.5 < heldout["kept_over_k"] < 2.0 and 0 < heldout["element_density"] < 1
    assert "held-out" in proc.stdout and "peak RSS" in proc.stdout
    assert not calibrate.checkpoint_path(out).exists()  # removed once the file is written


def test_the_file_records_the_model_it_was_made_for(own_data_run):
    from vllm_topt.config.identity import load_vocabulary_hash

    out, _, _ = own_data_run
    model = load_threshold_file(out).model
    assert model.source == str(DEFAULT_MODEL) and model.name == DEFAULT_MODEL.name
    assert model.vocab_hash == load_vocabulary_hash(str(DEFAULT_MODEL))
    # The folder scripts/build_model.py made says where its weights came from.
    assert model.weights.startswith("GGUF SmolLM2-135M-Instruct.Q4_1.gguf") or "converted from" in model.weights


def test_interrupted_run_resumes_to_the_same_thresholds(tmp_path, own_data_run, user_text):
    reference, _, _ = own_data_run
    out = tmp_path / "X.json"
    checkpoint = calibrate.checkpoint_path(out)
    args = [*SMALL_RUN, "--data", str(user_text), "--out", str(out)]
    # A terminal's Ctrl-C, whatever this test runs under: a runner started in the background
    # ignores SIGINT, and children inherit that, so the child gets the default disposition back.
    proc = subprocess.Popen([sys.executable, "-m", "calibration.calibrate", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first checkpoint was seen"
    proc.send_signal(signal.SIGINT)  # Ctrl-C, after the first sequence's checkpoint
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and checkpoint.exists() and not out.exists()

    assert "holds an interrupted run" in cli(*args).stderr  # never overwritten silently
    assert "--seq-len: 512 there, 400 here" in cli(*args, "--seq-len", "400", "--resume").stderr
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = json.loads(reference.read_text()), json.loads(out.read_text())
    assert b["thresholds"] == a["thresholds"]
    assert b["provenance"]["heldout"] == a["provenance"]["heldout"]
    assert not checkpoint.exists()


@pytest.fixture(scope="module")
def paper_layer_k_file(tmp_path_factory) -> Path:
    """The paper's recipe: the first two layers at k=512, calibrated at --seq-len 1024."""
    out = tmp_path_factory.mktemp("layer-k") / "paper.json"
    proc = cli("--model", MODEL, "--k", "32", "--layer-k", "0:512,1:512", "--num-seqs", "2", "--seq-len", "1024",
               "--heldout-seqs", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_layer_k_layers_get_their_own_grid(paper_layer_k_file):
    file = load_threshold_file(paper_layer_k_file)
    assert file.layer_k == {0: 512, 1: 512}
    for layer in (0, 1):
        grid = file.grid_for_layer(layer)
        assert grid[0] == 513 and grid[-1] == 1024 and len(file.thresholds[layer][0]) == len(grid)
    assert file.n_grid[0] == 33 and 0 not in file.dense_layers
    per_layer = file.provenance.heldout["kept_over_k_per_layer"]
    assert 0.5 < per_layer["0"] < 2.0 and 0.5 < per_layer["1"] < 2.0, per_layer  # k=512 met on held-out text


def test_layer_k_file_is_served_that_way(tmp_path, paper_layer_k_file):
    words = " ".join(bbc_articles("heldout")[:12]).split()
    prompts = [f"{' '.join(words[:n])}\n\nSummarise the news above in one sentence:" for n in (150, 800)]
    stats = tmp_path / "stats.json"
    topt = {"thresholds": str(paper_layer_k_file), "stats_file": str(stats), "telemetry_interval_s": 0}
    spec = {"backend": "TOPT", "topt": topt, "prompts": prompts, "max_tokens": 16, "ignore_eos": True}
    result = run_engine(spec, tmp_path, "layer-k")
    assert 32 < result["prompt_lens"][0] < 400 and result["prompt_lens"][1] > 600
    per_layer = json.loads(stats.read_text())["per_layer"]
    for layer, k in (("0", 512), ("1", 512), ("2", 32), ("29", 32)):
        c = per_layer[layer]
        assert c["thresholded_rows"] > 0 and c["thresholded_target"] == k * c["thresholded_rows"], (layer, c)
    # Only the long prompt's rows pass n > 512: layers 0-1 threshold half the rows of layer 2.
    assert per_layer["0"]["thresholded_rows"] < per_layer["2"]["thresholded_rows"]
    assert per_layer["0"]["elements_kept"] > per_layer["2"]["elements_kept"]
