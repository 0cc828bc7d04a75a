"""``fullgraph=False``: sites are checked across all graph fragments of one compile, so a
graph break outside the decoder layers steers correctly, and a break that hides a site is
an error instead of a silently unsteered call."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_outputs import CausalLMOutputWithPast

import sae_compile as sc
from sae_compile.lowering.op import STEER_OP
from tests.factories import assert_rel_close, random_sae, rel_err
from tests.models import hidden_size, make_model
from tests.reference import reference_logits

MLP, POST = "blocks.0.hook_mlp_out", "blocks.2.hook_resid_post"


class BreaksAroundTheDecoder(transformers.LlamaForCausalLM):
    """A Llama whose forward breaks the graph after the embedding and before the LM head:
    three fragments, of which only the middle one holds decoder layers."""

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        embeds = self.model.embed_tokens(input_ids)
        torch._dynamo.graph_break()
        hidden = self.model(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs).last_hidden_state
        torch._dynamo.graph_break()
        return CausalLMOutputWithPast(logits=self.lm_head(hidden))


def test_breaks_outside_the_layers_steer_like_the_reference() -> None:
    model = make_model("llama", seed=1)
    model.__class__ = BreaksAroundTheDecoder
    d = hidden_size(model)
    saes = {MLP: random_sae(d, 16, "relu", seed=1), POST: random_sae(d, 16, "jumprelu", seed=2)}
    graphs = []
    steered = sc.steer(model, saes, backend="aot_eager", fullgraph=False, on_graph=graphs.append)
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    steering = sc.Steering(sc.Clamp(MLP, 1, 5.0), sc.Clamp(POST, 2, 4.0, "add"))
    with torch.no_grad():
        got = steered(ids, steering=steering).logits
    ops = [sum(node.target is STEER_OP for node in gm.graph.nodes) for gm in graphs]
    assert len(graphs) == 3 and ops == [0, 2, 0], ops
    expected = reference_logits(model, ids, saes=saes, steering=steering)
    assert_rel_close(got, expected, 1e-5)
    assert rel_err(expected, reference_logits(model, ids)) > 1e-3


def test_a_break_that_hides_a_site_is_an_error() -> None:
    """The probe (2 tokens) sees every site; longer inputs break the graph inside the layer
    stack, where no fragment holds the sites: the call must raise, not run unsteered."""
    model = make_model("llama", seed=2)
    model.model.layers[1].register_forward_pre_hook(
        lambda module, args: torch._dynamo.graph_break() if args and args[0].shape[1] > 2 else None
    )
    steered = sc.steer(model, {POST: random_sae(hidden_size(model), 16, "relu")}, backend="aot_eager", fullgraph=False)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"could not find sites \['blocks.2.hook_resid_post'\]"):
        steered(torch.ones(1, 5, dtype=torch.long), steering=sc.Steering(sc.Clamp(POST, 1, 3.0)))
