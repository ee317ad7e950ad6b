"""The per-GPU memory accounting of sharded runs: the shapes are the real models', the sums add up."""
import pytest

from benchmarks.fsdp_memory import per_gpu, shape_terms


@pytest.mark.parametrize("name,published", [("random:qwen2.5-1.5b", 1_543_714_304),
                                            ("random:qwen2.5-7b", 7_615_616_512)])
def test_parameter_counts_are_the_published_ones(name, published):
    # the model cards' counts (1.54B tied, 7.61B untied); the embedding counted once when tied
    assert shape_terms(name)["parameters"] == published


def test_sharded_state_is_twenty_bytes_per_parameter_over_the_gpus_and_the_peak_adds_up():
    terms = shape_terms("random:qwen2.5-7b")
    one, eight = per_gpu(terms, 1, 16384), per_gpu(terms, 8, 16384)
    assert one["sharded_gib"] == pytest.approx(20 * terms["parameters"] / 2**30, rel=1e-3)
    assert eight["sharded_gib"] == pytest.approx(one["sharded_gib"] / 8, rel=1e-3)
    assert eight["training_gib"] == one["training_gib"]  # gathered weights and activations are not sharded
    assert eight["peak_gib"] == pytest.approx(eight["sharded_gib"] + max(eight["training_gib"],
                                                                          eight["rollout_gib"]), abs=0.02)
    longer = per_gpu(terms, 8, 32768)
    assert longer["training"]["checkpointed_layer_inputs_bf16"] == pytest.approx(
        2 * eight["training"]["checkpointed_layer_inputs_bf16"], abs=0.02)
