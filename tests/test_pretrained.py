"""anecy.pretrained: one way to find a model's weights and tokenizer, whatever holds them."""
from pathlib import Path

import numpy as np
import pytest

from anecy import CheckpointError, ModelConfig, TrainConfig, Trainer
from anecy.checkpoint import save_checkpoint
from anecy.pretrained import inspect, load, load_into

DATA = Path(__file__).resolve().parent / "data"


def test_kinds_are_told_apart_by_content(tmp_path):
    assert inspect(DATA / "llama2c_untied_v1.bin").kind == "llama2c"
    tc = TrainConfig(steps=1, accum=1, ckpt_path=str(tmp_path / "a.ckpt"))
    first = Trainer(ModelConfig.preset("tiny"), tc, log=lambda *a: None)
    first.run(progress=False)
    for kind in ("checkpoint", "init", "auto"):
        assert inspect(tmp_path / "a.ckpt", kind).kind == "checkpoint"
    with pytest.raises(CheckpointError, match="not an anecy checkpoint"):
        inspect(DATA / "llama2c_untied_v1.bin", "checkpoint")
    save_checkpoint(tmp_path / "other.ckpt", {"kind": "something-else"}, {})
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        inspect(tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="no such file"):
        inspect(tmp_path / "none")

    # a sampler's model keeps the checkpoint's active vocabulary ...
    sampled = load(inspect(tmp_path / "a.ckpt"))
    np.testing.assert_array_equal(sampled.active_ids, first.vocab.active_ids)
    np.testing.assert_array_equal(sampled.params, first.model.params)
    # ... a new run from its weights keeps its own (here: the full vocabulary)
    tc2 = TrainConfig(steps=1, accum=1, lr=1e-12, compact_vocab=False,
                      init_from=str(tmp_path / "a.ckpt"))
    second = Trainer(ModelConfig.preset("tiny"), tc2, log=lambda *a: None)
    assert second.model.active_ids is None
    np.testing.assert_array_equal(second.model.params, first.model.params)
    second.step()
    np.testing.assert_allclose(second.model.params, first.model.params, rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="another model"):
        load_into(load(inspect(DATA / "llama2c_untied_v1.bin")), tmp_path / "a.ckpt")


def test_weights_from_a_training_checkpoint_leave_its_adam_moments_on_disk(tmp_path):
    """Loading a training checkpoint's weights (sample, --init-from) holds the staged
    weights, not the two Adam moments the file also carries (each as large as them)."""
    import tracemalloc
    tc = TrainConfig(steps=1, accum=1, ckpt_path=str(tmp_path / "a.ckpt"))
    trainer = Trainer(ModelConfig.preset("tiny"), tc, log=lambda *a: None)
    trainer.run(progress=False)
    model = load(inspect(tmp_path / "a.ckpt"))
    params_bytes = model.params.nbytes
    tracemalloc.start()
    load_into(model, inspect(tmp_path / "a.ckpt"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # staged weights, plus one skipped array streamed through a scratch buffer of at
    # most its own size; all three arrays at once would be 3x
    assert peak < 2.5 * params_bytes, (peak, params_bytes)
    np.testing.assert_array_equal(model.params, trainer.model.params)
