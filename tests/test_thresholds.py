"""Threshold files: schema checks, clear errors, lookup, shipped files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from vllm_topt.config.options import (
    ToptConfigError,
    ToptOptions,
    check_served_identity,
    options_from_vllm_config,
    resolve_thresholds,
)
from vllm_topt.config.thresholds import (
    LayerThresholds,
    ThresholdFile,
    ThresholdFileError,
    describe,
    page_size_warning,
    check_matches_model,
    find_shipped_thresholds,
    load_threshold_file,
    model_fingerprint,
    shipped_config_files,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


def fake_hf_config(**overrides):
    values = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=128, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1000,
        rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def valid_file_dict(hf_config=None) -> dict:
    hf_config = hf_config or fake_hf_config()
    grid = [33, 64, 128, 256]
    return {
        "schema_version": 1,
        "model": {
            "name": "tiny", "architecture": "LlamaForCausalLM", "num_layers": 2, "num_heads": 4,
            "num_kv_heads": 2, "head_size": 32, "fingerprint": model_fingerprint(hf_config),
        },
        "target_k": 32,
        "layer_k": {"1": 48},
        "dense_layers": [],
        "placement": "post-softmax",
        "compensation": {"sdc": "none", "vmc": True},
        "n_grid": grid,
        "thresholds": [[[2.0 / n * (h + 1) / 4 for n in grid] for h in range(4)] for _ in range(2)],
        "provenance": {
            "data": "unit test", "num_sequences": 1, "max_seq_len": 256, "tool": "test", "date": "2026-11-28",
        },
    }


def write(tmp_path, content, name="t.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_valid_file_loads(tmp_path):
    f = load_threshold_file(write(tmp_path, valid_file_dict()))
    assert f.k_for_layer(0) == 32 and f.k_for_layer(1) == 48
    check_matches_model(f, fake_hf_config(), "t.json")
    # A file without vmc_scope (every file before block-wise VMC) compensates over the sequence.
    assert [rule.vmc_scope for rule in f.layer_rules()] == ["sequence", "sequence"]


def test_block_vmc_reaches_every_layer_rule(tmp_path):
    d = valid_file_dict()
    d["compensation"]["vmc_scope"] = "block"
    rules = load_threshold_file(write(tmp_path, d)).layer_rules()
    assert [(r.k, r.vmc_scope, r.block_vmc) for r in rules] == [(32, "block", True), (48, "block", True)]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema_version=7), "unknown schema_version 7"),
        (lambda d: d["thresholds"][0][1].pop(), "layer 0 head 1: 3 values for 4 grid points"),
        (lambda d: d["thresholds"][1].pop(), "layer 1 has thresholds for 3 heads"),
        (lambda d: d.pop("placement"), "placement"),
        (lambda d: d.update(placement="mid-softmax"), "placement"),
        (lambda d: d["thresholds"][0][0].__setitem__(0, 1.5), "not a probability"),
        (lambda d: d.update(n_grid=[64, 33, 128, 256]), "strictly increasing"),
        (lambda d: d.update(unknown_key=1), "unknown_key"),
        (lambda d: d["compensation"].update(sdc="exact"), "SDC applies to pre-softmax"),
        (lambda d: d["compensation"].update(vmc_scope="page"), "vmc_scope"),
        (lambda d: d["thresholds"].__setitem__(1, None), "layer 1 has no thresholds but is not in dense_layers"),
        (lambda d: d.update(layer_n_grid={"1": [49, 256]}), "layer 1 head 0: 4 values for 2 grid points"),
        (lambda d: d.update(layer_n_grid={"1": [256, 49]}), "layer_n_grid[1] must hold at least 2 strictly"),
        (lambda d: d.update(layer_n_grid={"5": [49, 256]}), "layer index 5 out of range"),
    ],
)
def test_malformed_files_name_file_and_problem(tmp_path, mutate, message):
    d = valid_file_dict()
    mutate(d)
    path = write(tmp_path, d)
    with pytest.raises(ThresholdFileError) as exc:
        load_threshold_file(path)
    assert str(path) in str(exc.value)
    assert message in str(exc.value)


def test_a_layer_with_its_own_grid_is_looked_up_on_it(tmp_path):
    d = valid_file_dict()
    d["layer_n_grid"] = {"1": [49, 100, 200, 256]}
    f = load_threshold_file(write(tmp_path, d))
    assert f.grid_for_layer(0) == [33, 64, 128, 256] and f.grid_for_layer(1) == [49, 100, 200, 256]
    own = f.layer_thresholds(1).lookup(torch.tensor([49, 100]))
    assert torch.allclose(own[:, 0], torch.tensor([2.0 / 33 / 4, 2.0 / 64 / 4], dtype=torch.float64))
    assert f.rule_for_layer(1).k == 48 and f.rule_for_layer(0).k == 32 and f.rule_for_layer(1, True).dense
    assert f.layer_thresholds(0, slice(2, 4)).table.shape == (2, 4)  # a rank's heads


def test_nan_is_rejected(tmp_path):
    text = json.dumps(valid_file_dict()).replace("0.015151515151515152", "NaN", 1)
    assert "NaN" in text
    with pytest.raises(ThresholdFileError, match="NaN is not allowed"):
        load_threshold_file(write(tmp_path, text))


def test_invalid_json_and_missing_file(tmp_path):
    with pytest.raises(ThresholdFileError, match="is not valid JSON"):
        load_threshold_file(write(tmp_path, "{not json"))
    with pytest.raises(ThresholdFileError, match="does not exist"):
        load_threshold_file(tmp_path / "absent.json")


def test_wrong_model_is_refused(tmp_path):
    f = load_threshold_file(write(tmp_path, valid_file_dict()))
    with pytest.raises(ThresholdFileError, match="num_heads=4, but the served model has num_heads=8"):
        check_matches_model(f, fake_hf_config(num_attention_heads=8, hidden_size=256), "t.json")
    with pytest.raises(ThresholdFileError, match="fingerprint"):
        check_matches_model(f, fake_hf_config(vocab_size=999), "t.json")


def test_options_reject_unknown_keys():
    cfg = SimpleNamespace(additional_config={"topt": {"threshold": "x.json"}})
    with pytest.raises(ToptConfigError, match="Known keys: thresholds"):
        options_from_vllm_config(cfg)
    assert options_from_vllm_config(SimpleNamespace(additional_config={})) == ToptOptions()


def test_no_shipped_file_for_unknown_model_says_how_to_calibrate():
    with pytest.raises(ThresholdFileError, match="vllm-topt-calibrate"):
        resolve_thresholds(ToptOptions(), fake_hf_config(vocab_size=12345), "some/model")


def lookup_by_hand(grid, values, n, placement):
    """Plain-Python version of the documented rule, for one head."""
    xs = [math.log(g) for g in grid]
    ys = [math.log(v) for v in values] if placement == "post-softmax" else list(values)
    x = math.log(n)
    if x <= xs[0]:
        y = ys[0]
    elif x <= xs[-1]:
        i = next(i for i in range(1, len(xs)) if x <= xs[i])
        y = ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    else:
        fit = [(a, b) for a, b in zip(xs, ys) if a >= xs[-1] + math.log(0.5) - 1e-12]
        mx = sum(a for a, _ in fit) / len(fit)
        my = sum(b for _, b in fit) / len(fit)
        slope = sum((a - mx) * (b - my) for a, b in fit) / sum((a - mx) ** 2 for a, _ in fit)
        slope = min(max(slope, -1.0), 0.0) if placement == "post-softmax" else max(slope, 0.0)
        y = ys[-1] + slope * (x - xs[-1])
    return math.exp(y) if placement == "post-softmax" else y


@pytest.mark.parametrize("placement", ["post-softmax", "pre-softmax"])
def test_lookup_interpolates_and_extrapolates(placement):
    grid = [33, 50, 100, 200, 400]
    if placement == "post-softmax":
        values = [[0.9 / n**0.7 for n in grid], [3.0 / n**1.4 for n in grid]]  # second: slope clamps at -1
    else:
        values = [[2.0 + 0.5 * math.log(n) for n in grid], [5.0 - 0.1 * math.log(n) for n in grid]]  # clamps at 0
    table = LayerThresholds(grid, values, placement)
    ns = [1, 20, 33, 40, 77, 200, 399, 400, 800, 3200, 100_000]
    got = table.lookup(torch.tensor(ns))
    for i, n in enumerate(ns):
        for h in range(2):
            assert got[i, h].item() == pytest.approx(lookup_by_hand(grid, values[h], n, placement), rel=1e-9)
    memo = table.lookup_memoised(torch.tensor(ns))
    torch.testing.assert_close(memo, got.float())
    # Beyond the grid the threshold keeps tightening (post: falls like n^-0.7, not clamped).
    if placement == "post-softmax":
        assert got[-1, 0] < got[7, 0] * (400 / 100_000) ** 0.69


def test_shipped_files_are_valid():
    files = shipped_config_files()
    assert files, "configs/ must ship at least one threshold file"
    for path in files:
        f = load_threshold_file(path)
        assert f.provenance.num_sequences > 0


def test_default_is_the_quality_file_where_one_ships_and_speed_is_opt_in():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(DEFAULT_MODEL)
    f, default = resolve_thresholds(ToptOptions(), config, str(DEFAULT_MODEL))
    assert default.name == "smollm2-135m-instruct.k48.post-softmax.quality.json" and f.target_k == 48
    assert resolve_thresholds(ToptOptions(operating_point="quality"), config, str(DEFAULT_MODEL))[1] == default
    _, speed = resolve_thresholds(ToptOptions(operating_point="speed"), config, str(DEFAULT_MODEL))
    assert speed.name == "smollm2-135m-instruct.k32.post-softmax.json"
    with pytest.raises(ValidationError):
        ToptOptions(operating_point="fast")


def test_default_falls_back_to_the_speed_file_where_no_quality_file_ships(gemma_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gemma_model)
    _, path = resolve_thresholds(ToptOptions(), config, str(gemma_model))
    assert path.name == "gemma3-270m.k32.post-softmax.json"


def test_quality_operating_point_without_a_quality_file_says_what_to_do():
    config = fake_hf_config()  # a model nothing is shipped for
    with pytest.raises(ThresholdFileError, match="ships no quality threshold file for model tiny.*operating_point"):
        resolve_thresholds(ToptOptions(operating_point="quality"), config, "tiny")


def test_thresholds_and_operating_point_together_are_refused_as_contradictory():
    with pytest.raises(ToptConfigError, match="contradict each other"):
        options_from_vllm_config(SimpleNamespace(additional_config={"topt": {"thresholds": "t.json",
                                                                             "operating_point": "speed"}}))


def test_a_corrupt_shipped_file_is_an_error_naming_it(tmp_path, monkeypatch):
    from vllm_topt.config import thresholds as module

    good = write(tmp_path, valid_file_dict(), "good.json")
    corrupt = write(tmp_path, '{"schema_version": 1, "model": ', "corrupt.json")
    monkeypatch.setattr(module, "shipped_config_files", lambda: [corrupt, good])
    with pytest.raises(ThresholdFileError, match=f"(?s){corrupt}.*not valid JSON.*installation is damaged"):
        find_shipped_thresholds(fake_hf_config())


def identity_file(tmp_path, **model) -> ThresholdFile:
    d = valid_file_dict()
    d["model"].update(model)
    return load_threshold_file(write(tmp_path, d))


def test_a_model_sharing_the_fingerprint_is_told_apart_by_name_and_vocabulary(tmp_path):
    """The general Qwen2.5-0.5B-Instruct shares the Coder model's config values: the name refuses it."""
    coder = identity_file(tmp_path, name="Qwen2.5-Coder-0.5B-Instruct", source="models/Qwen2.5-Coder-0.5B-Instruct",
                          vocab_hash="sha256:aaaa")
    assert check_served_identity(coder, Path("c.json"), "Qwen/Qwen2.5-Coder-0.5B-Instruct", "sha256:aaaa", False) == []
    assert check_served_identity(coder, Path("c.json"), "/srv/qwen2.5-coder-0.5b-instruct/", "sha256:aaaa", False) == []
    with pytest.raises(ThresholdFileError, match=r"c.json was made for another model \(model name: the file's is "
                                                 r"'Qwen2.5-Coder-0.5B-Instruct'.*allow_model_mismatch"):
        check_served_identity(coder, Path("c.json"), "Qwen/Qwen2.5-0.5B-Instruct", "sha256:aaaa", False)
    with pytest.raises(ThresholdFileError, match="tokenizer vocabulary: the file's hash is sha256:aaaa.*vllm-topt-calibrate"):
        check_served_identity(coder, Path("c.json"), "Qwen2.5-Coder-0.5B-Instruct", "sha256:bbbb", False)
    notes = check_served_identity(coder, Path("c.json"), "Qwen/Qwen2.5-0.5B-Instruct", "sha256:bbbb", True)
    assert len(notes) == 2 and all("served anyway: allow_model_mismatch" in n for n in notes)


def test_files_without_a_recorded_vocabulary_still_load_and_only_warn(tmp_path):
    old = identity_file(tmp_path)  # name "tiny", no source / vocab_hash / weights
    assert old.model.vocab_hash is None and old.model.weights is None
    notes = check_served_identity(old, Path("old.json"), "other-model", "sha256:cccc", False)
    assert any("predates recorded vocabularies" in n for n in notes)
    assert any("records no tokenizer vocabulary" in n for n in notes)


def test_allow_model_mismatch_lets_a_different_config_through_but_never_another_geometry(tmp_path):
    f = load_threshold_file(write(tmp_path, valid_file_dict()))
    with pytest.raises(ThresholdFileError, match="allow_model_mismatch"):
        check_matches_model(f, fake_hf_config(vocab_size=999), "t.json")
    assert "config fingerprint" in check_matches_model(f, fake_hf_config(vocab_size=999), "t.json", True)[0]
    with pytest.raises(ThresholdFileError, match="num_heads=4, but the served model has num_heads=8"):
        check_matches_model(f, fake_hf_config(num_attention_heads=8, hidden_size=256), "t.json", True)


def test_shipped_files_record_what_they_were_calibrated_on():
    for path in shipped_config_files():
        f = load_threshold_file(path)
        assert f.model.source and f.model.vocab_hash and "dequantised" in f.model.weights, path.name
        if f.compensation.vmc_scope == "block":
            assert f.compensation.block_size == 128, path.name
        described = describe(f)
        assert f.model.name in described, described
        if path.name.endswith(".quality.json"):  # the default files: their measured cost is always on record
            assert "perplexity" in f.provenance.heldout, path.name
        if "perplexity" in f.provenance.heldout:
            assert "vs dense" in described and "of elements" in described and "V rows" in described, described
        else:
            assert "perplexity not recorded" in described, described


def test_shipped_vocabulary_hash_matches_the_built_model():
    from vllm_topt.config.identity import load_vocabulary_hash

    _, path = resolve_thresholds(ToptOptions(), __import__("transformers").AutoConfig.from_pretrained(DEFAULT_MODEL),
                                 str(DEFAULT_MODEL))
    assert load_threshold_file(path).model.vocab_hash == load_vocabulary_hash(str(DEFAULT_MODEL))


def test_the_start_up_description_names_the_recorded_held_out_loss_and_densities():
    path = next(p for p in shipped_config_files() if p.name == "smollm2-135m-instruct.k48.post-softmax.quality.json")
    f = load_threshold_file(path)
    heldout = f.provenance.heldout
    described = describe(f)
    assert f"perplexity {heldout['perplexity']['loss_pct']:+.2f}% vs dense" in described
    assert f"{heldout['element_density']:.1%} of elements" in described
    assert "block VMC at 128-token pages" in described and "mean k=48 (per-layer budget)" in described


def test_another_page_size_than_calibrated_is_a_warning_with_the_measured_consequence(tmp_path):
    d = valid_file_dict()
    d["compensation"].update(vmc_scope="block", block_size=128)
    f = load_threshold_file(write(tmp_path, d))
    assert page_size_warning(f, 128, "t.json") is None
    warning = page_size_warning(f, 16, "t.json")
    assert "128-token KV pages, but this server pages by 16 tokens" in warning and "+1.33%" in warning
    d["compensation"].update(vmc_scope="sequence", block_size=None)
    assert page_size_warning(load_threshold_file(write(tmp_path, d)), 16, "t.json") is None


def test_thresholds_on_sliding_window_layers_are_refused(tmp_path, gemma_model):
    """A file that thresholds a layer the model runs with a sliding window (an older calibration)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gemma_model)
    path = find_shipped_thresholds(config)
    assert path is not None and "gemma3" in path.name
    shipped = json.loads(path.read_text())
    assert shipped["dense_layers"] == [i for i in range(18) if i not in (5, 11, 17)]
    assert "sliding-window attention (window 512)" in shipped["dense_layer_reasons"]["0"]
    shipped["dense_layers"].remove(0)
    del shipped["dense_layer_reasons"]["0"]
    shipped["thresholds"][0] = shipped["thresholds"][5]
    old = write(tmp_path, shipped)
    with pytest.raises(ThresholdFileError, match=r"thresholds for layers \[0\], which the served model runs with a "
                                                 "sliding window.*Recalibrate"):
        check_matches_model(load_threshold_file(old), config, old)
