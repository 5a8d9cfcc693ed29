"""The in-place KV-cache layer (``moduleformer_exit.kv_cache``) against transformers' concatenating ``DynamicLayer``
(the reference: ``torch.cat`` of everything appended) and, through the model, against decoding without a cache."""
import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from conftest import tiny_config_kwargs
from moduleformer_exit import ModuleFormerConfig, ModuleFormerForCausalLM
from moduleformer_exit.hf_compat import cache_kwargs
from moduleformer_exit.kv_cache import _MIN_CAPACITY, GrowingLayer, use_growing_layers


def _states(gen, b, t, h=2, d=3):
    return torch.randn(b, h, t, d, generator=gen), torch.randn(b, h, t, d, generator=gen)


def _assert_same(layer, ref):
    assert layer.get_seq_length() == ref.get_seq_length()
    torch.testing.assert_close(layer.keys, ref.keys, atol=0, rtol=0)
    torch.testing.assert_close(layer.values, ref.values, atol=0, rtol=0)


def test_appends_equal_concatenation_across_growth():
    gen = torch.Generator().manual_seed(0)
    layer, ref = GrowingLayer(), DynamicLayer()
    lengths = [5] + [1] * (2 * _MIN_CAPACITY) + [7, 3]  # crosses the first capacity and a doubling
    buffers = set()
    for t in lengths:
        k, v = _states(gen, 2, t)
        out_k, out_v = layer.update(k, v)
        buffers.add(layer._key_buffer.data_ptr())
        ref_k, ref_v = ref.update(k, v)
        torch.testing.assert_close(out_k, ref_k, atol=0, rtol=0)
        torch.testing.assert_close(out_v, ref_v, atol=0, rtol=0)
    assert layer._key_buffer.shape[2] >= sum(lengths) > _MIN_CAPACITY
    assert layer.keys.data_ptr() == layer._key_buffer.data_ptr()  # a view: appends did not copy the cache
    assert len(buffers) <= 3  # capacity doubles: O(log S) reallocations, not one per step


@pytest.mark.parametrize("operation", ["crop", "select", "repeat", "reorder", "reset"])
def test_inherited_operations_then_appends_match_dynamic_layer(operation):
    gen = torch.Generator().manual_seed(1)
    layer, ref = GrowingLayer(), DynamicLayer()
    for t in (4, 1, 1):
        k, v = _states(gen, 3, t)
        layer.update(k, v)
        ref.update(k, v)
    for target in (layer, ref):
        if operation == "crop":
            target.crop(-2)
        elif operation == "select":
            target.batch_select_indices(torch.tensor([2, 0]))
        elif operation == "repeat":
            target.batch_repeat_interleave(2)
        elif operation == "reorder":
            target.reorder_cache(torch.tensor([1, 2, 0]))
        else:
            target.reset()
    if layer.is_initialized or ref.is_initialized:
        _assert_same(layer, ref)
    batch = {"select": 2, "repeat": 6}.get(operation, 3)
    for t in (1, 2, 1):
        k, v = _states(gen, batch, t)
        layer.update(k, v)
        ref.update(k, v)
        _assert_same(layer, ref)


def test_use_growing_layers_replaces_only_empty_plain_layers():
    cache = DynamicCache()
    for i in range(2):
        cache.layers.append(DynamicLayer())
    cache.layers[1].update(*_states(torch.Generator().manual_seed(2), 1, 2))
    use_growing_layers(cache)
    assert type(cache.layers[0]) is GrowingLayer and type(cache.layers[1]) is DynamicLayer
    assert use_growing_layers(None) is None


def test_model_decode_uses_growing_layers_and_matches_uncached_greedy():
    torch.manual_seed(0)
    model = ModuleFormerForCausalLM(ModuleFormerConfig(**tiny_config_kwargs())).eval()
    prompt = torch.randint(3, 97, (2, 5))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=_MIN_CAPACITY + 4, min_new_tokens=_MIN_CAPACITY + 4,
                             do_sample=False, pad_token_id=0, output_logits=True, **cache_kwargs(cache),
                             return_dict_in_generate=True)
        assert all(type(layer) is GrowingLayer for layer in cache.layers)
        # reference: each step recomputes the whole sequence without a cache
        ids = prompt
        for step, logits in enumerate(out.logits):
            full = model(ids, use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5, msg=f"step {step}")
            ids = torch.cat([ids, full.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, ids)
