"""torch.export / torch.compile of a tiny fp32 ModuleFormer: the expert and stick-breaking kernels are custom ops
with shape functions, so tracing works; the exported / compiled model must give eager's logits (and gradients)."""
import torch

from conftest import tiny_config_kwargs
from moduleformer_exit import ModuleFormerConfig, ModuleFormerForCausalLM


def _model(seed=0):
    torch.manual_seed(seed)
    return ModuleFormerForCausalLM(ModuleFormerConfig(**tiny_config_kwargs())).eval()


def test_torch_export_matches_eager():
    model = _model()
    ids = torch.randint(3, 97, (2, 9))  # T > 4: the blocked stick-breaking op; 18 tokens: the routing-plan path
    eager = model(ids, use_cache=False).logits
    program = torch.export.export(model, (ids,), kwargs={"use_cache": False}, strict=False)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("moduleformer.expert_linear" in t for t in targets)
    assert any("moduleformer.stick_breaking_fwd" in t for t in targets)
    exported = program.module()(ids, use_cache=False).logits
    torch.testing.assert_close(exported, eager, atol=1e-6, rtol=1e-6)
    other = torch.randint(3, 97, (2, 9))  # same shapes, new data: the program is not specialised to the inputs
    torch.testing.assert_close(program.module()(other, use_cache=False).logits, model(other, use_cache=False).logits,
                               atol=1e-6, rtol=1e-6)


def test_torch_compile_forward_backward_matches_eager():
    model = _model(1).train()
    ids = torch.randint(3, 97, (2, 9))

    def loss_and_grads(m):
        m.zero_grad(set_to_none=True)
        out = m(ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits_e, grads_e = loss_and_grads(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)  # aot_eager: no C++ toolchain needed
    logits_c, grads_c = loss_and_grads(compiled)
    torch.testing.assert_close(logits_c, logits_e, atol=1e-6, rtol=1e-6)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 10
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-6, rtol=1e-5, msg=name)
