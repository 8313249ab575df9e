"""Per-request modes without an engine: validation, the row flags vLLM's batch updates move, the
processor chosen per model runner, and the device buffer the CUDA builder fills.

The same flags through the real engine and server: tests/test_engine.py (mixed batch) and
tests/test_server.py (a 400 for an unknown mode)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from vllm_topt import request_modes


def params(mode: str | None = None) -> SamplingParams:
    return SamplingParams(extra_args=None if mode is None else {"topt": mode})


def engine_config(max_num_seqs: int = 4, points: dict | None = None):
    return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
                           additional_config={"topt": {"request_points": points or {}}})


@pytest.fixture(autouse=True)
def built_in_modes():
    request_modes.accept_modes_of(engine_config())
    yield
    request_modes.accept_modes_of(engine_config())


def test_a_mode_is_sparse_dense_or_absent_and_anything_else_names_the_allowed_ones():
    assert request_modes.requested_mode(params()) is None
    assert request_modes.requested_mode(params("dense")) == "dense"
    assert request_modes.requested_mode(params("sparse")) == "sparse"
    with pytest.raises(ValueError, match=r"'fast' is not a TOPT mode of this server; allowed: 'sparse', 'dense'"):
        request_modes.ToptRequestModes.validate_params(params("fast"))


def test_a_server_accepts_its_request_points_by_name_and_codes_them_after_dense():
    request_modes.install(SimpleNamespace(**vars(engine_config(points={"speed": "speed", "mine": "/x.json"})),
                                          use_v2_model_runner=False,
                                          model_config=SimpleNamespace(runner_type="generate", logits_processors=[])))
    assert request_modes.accepted_modes() == ("sparse", "dense", "speed", "mine")
    assert [request_modes.mode_code(params(m)) for m in (None, "sparse", "dense", "speed", "mine")] == [0, 0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"allowed: 'sparse', 'dense', 'speed', 'mine'"):
        request_modes.ToptRequestModes.validate_params(params("quality"))


def test_row_flags_follow_the_persistent_batch():
    # The engine's processor accepts the modes of its own configuration (the front end's `install` ran elsewhere).
    modes = request_modes.ToptRequestModes(engine_config(points={"q": "quality"}), torch.device("cpu"), False)
    update = BatchUpdate(batch_size=3, removed=[],
                         added=[(0, params("dense"), None, []), (1, params(), None, []), (2, params("q"), None, [])],
                         moved=[])
    modes.update_state(update)
    assert modes.codes.tolist() == [1, 0, 2, 0]
    assert request_modes.row_modes(3).tolist() == [1, 0, 2]
    # Row 0 finishes; row 2 moves into its place (vLLM condenses the batch), then rows 0 and 1 swap.
    modes.update_state(BatchUpdate(batch_size=2, removed=[0], added=[],
                                   moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL), (0, 1, MoveDirectionality.SWAP)]))
    assert modes.codes.tolist() == [0, 2, 0, 0]
    modes.update_state(BatchUpdate(batch_size=2, removed=[1], added=[], moved=[]))
    assert request_modes.row_modes(2) is None  # every request in the server's mode: the layers take the plain path
    logits = torch.randn(2, 7)
    assert modes.apply(logits) is logits and modes.is_argmax_invariant()


def test_the_processor_matches_the_model_runner_and_is_added_once():
    def config(v2: bool, runner: str = "generate"):
        return SimpleNamespace(use_v2_model_runner=v2,
                               model_config=SimpleNamespace(runner_type=runner, logits_processors=["other:Proc"]))

    v1 = config(False)
    request_modes.install(v1)
    request_modes.install(v1)
    assert v1.model_config.logits_processors == ["other:Proc", request_modes.V1_PROCESSOR]
    v2 = config(True)
    request_modes.install(v2)
    assert v2.model_config.logits_processors == ["other:Proc", request_modes.V2_PROCESSOR]
    pooling = config(False, runner="pooling")
    request_modes.install(pooling)
    assert pooling.model_config.logits_processors == ["other:Proc"]


def test_the_v2_runner_refuses_a_mode_and_says_how_to_get_one():
    from vllm.utils.import_utils import resolve_obj_by_qualname

    processor = resolve_obj_by_qualname(request_modes.V2_PROCESSOR.replace(":", "."))
    processor.validate_params(params())  # saying nothing is fine
    with pytest.raises(ValueError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        processor.validate_params(params("dense"))


def test_the_device_buffer_holds_this_steps_modes_and_clears():
    modes = request_modes.RowModes(5, "cpu")
    pointer = modes.tensor.data_ptr()
    assert modes.fill(torch.tensor([1, 0, 2], dtype=torch.int32)).tolist() == [1, 0, 2, 0, 0]
    assert modes.fill(torch.tensor([0, 1], dtype=torch.int32)).tolist() == [0, 1, 0, 0, 0]  # stale rows cleared
    assert modes.fill(None).tolist() == [0] * 5 and not modes.dirty
    assert modes.tensor.data_ptr() == pointer  # one buffer for good: a captured graph reads it
    with pytest.raises(RuntimeError, match="row modes sized for 5"):
        modes.fill(torch.ones(6, dtype=torch.int32))


@pytest.mark.parametrize("points, message", [
    ({"dense": "speed"}, "request point name 'dense'.*built in"),
    ({"my point": "speed"}, "request point name 'my point'"),
    ({"fast": "turbo"}, "'turbo' is neither a shipped operating point .*nor a threshold file"),
])
def test_request_points_are_named_and_sourced_as_the_options_say(points, message):
    from vllm_topt.config.options import ToptConfigError, options_from_vllm_config

    with pytest.raises(ToptConfigError, match=message):
        options_from_vllm_config(SimpleNamespace(additional_config={"topt": {"request_points": points}}))


def test_a_request_point_that_does_not_load_is_named_in_the_error():
    from transformers import AutoConfig

    from tests.engine_run import DEFAULT_MODEL
    from vllm_topt.config.options import ToptOptions, resolve_request_points
    from vllm_topt.config.thresholds import ThresholdFileError

    hf_config = AutoConfig.from_pretrained(DEFAULT_MODEL)
    options = ToptOptions(request_points={"speed": "speed", "mine": "/nowhere/mine.json"})
    with pytest.raises(ThresholdFileError, match=r"request point 'mine' \(/nowhere/mine.json\): .*does not exist"):
        resolve_request_points(options, hf_config, "SmolLM2")
    (name, file, path, _), = resolve_request_points(ToptOptions(request_points={"speed": "speed"}), hf_config, "x")
    assert name == "speed" and file.target_k == 32 and path.name == "smollm2-135m-instruct.k32.post-softmax.json"
