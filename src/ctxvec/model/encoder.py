"""Step 8 of the assembly line: stack the layers; ``Encoder`` = embeddings + positions + stack.

Public mask convention, everywhere: ``attention_mask`` of shape (B, T), 1/True = real token,
0/False = padding. It is checked and converted once, here, into the route of the forward pass
(``model.route``), whose boolean "may attend" key mask every layer shares.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ctxvec.model.config import EncoderConfig
from ctxvec.model.embedding import Embeddings, LearnedPositionalEncoding, TokenEmbedding, init_normal_
from ctxvec.model.layer import EncoderLayer
from ctxvec.model.masks import check_attention_mask, is_integer_tensor
from ctxvec.model.route import Route, choose_route

log = logging.getLogger(__name__)


@dataclass
class EncoderOutput:
    """What the encoder returns.

    Attributes:
        last_hidden_state: (B, T, D) one context vector per token; 0 at padding positions.
            With ``positions``: (M, D), the vectors at those positions only, in row-major order
            (``h[positions]``).
        hidden_states: with ``output_hidden_states``: the layer stack's input followed by each
            layer's output, n_layers + 1 tensors of (B, T, D).
        attentions: with ``output_attentions``: each layer's attention probabilities,
            n_layers tensors of (B, H, T, T); every row sums to 1 over the real tokens.
        route: how this forward pass ran and why (``model.route``).
    """

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    route: str = ""


class NonFiniteError(ValueError):
    """NaN or inf where real numbers must be: in an input, in the weights, or from an overflow."""


def check_finite(values: torch.Tensor, what: str, model: nn.Module, real: torch.Tensor | None = None) -> None:
    """Raise ``NonFiniteError`` naming the cause if ``values`` holds NaN or inf.

    NaN never passes silently: it would spread into every vector it touches and, through
    attention, into every token of the text. The check costs one pass over the activations.

    Args:
        values: (B, T, D) activations, or a route's view of them.
        what: what ``values`` are, for the message.
        model: the module whose weights are named if they are the cause.
        real: (B, T) bool; positions where it is False (padding) are not checked.
    """
    # One reduction first: a sum is finite only if every term is (NaN and inf propagate), so the
    # element-wise search below runs only when something is wrong (or the sum overflowed).
    if bool(torch.isfinite(values.detach().sum())):
        return
    finite = torch.isfinite(values)
    if real is not None:
        finite |= ~real[..., None]  # (B, T, 1): padding never reaches a real token
    if bool(finite.all()):
        return
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(f"{what} holds NaN or inf because the model's weights do: {names}.")
    first = tuple((~finite).nonzero()[0].tolist())
    raise NonFiniteError(f"{what} holds NaN or inf (first at index {first}); "
                         + ("the values overflowed in this precision." if values.dtype in
                            (torch.float16, torch.bfloat16) else "the input must be finite."))


def check_token_ids(ids: torch.Tensor, config: EncoderConfig, name: str = "input_ids", start: int = 0) -> None:
    """Clear errors for token ids that would otherwise fail deep inside PyTorch: an integer
    (B, T) tensor, T >= 1, ids in the vocabulary, positions ``start .. start + T - 1`` in the table."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}.")
    if not is_integer_tensor(ids):
        raise TypeError(f"{name} must be an integer tensor of token ids, got {ids.dtype}.")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, seq_len), got {tuple(ids.shape)}"
                         + (f"; for one sequence use {name}[None]." if ids.dim() == 1 else "."))
    if ids.shape[1] == 0:
        raise ValueError(f"{name} has seq_len 0; every sequence needs at least one token.")
    if start + ids.shape[1] > config.max_len:
        target = name == "tgt_ids"  # a decoder's: its own output, nothing to truncate
        advice = "" if target else ("; truncate the input (the tokenizer's max_len does it and reports "
                                    "which texts were cut)")
        raise ValueError(f"{'target' if target else 'sequence'} length {start + ids.shape[1]} exceeds "
                         f"max_len={config.max_len}, the size of the position table{advice}.")
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= config.vocab_size:
            raise ValueError(f"{name}: token id {low if low < 0 else high} is outside the vocabulary "
                             f"[0, {config.vocab_size}).")


def init_weights(module: nn.Module) -> None:
    """One initialisation for every module (BERT's N(0, 0.02) for weight matrices)."""
    if isinstance(module, nn.Linear):
        init_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (TokenEmbedding, LearnedPositionalEncoding)):
        module.reset_parameters()


class LayerStack(nn.Module):
    """``config.n_layers`` layers of ``layer_class`` in turn, plus a final LayerNorm where the
    config has one (pre-norm needs it): what the encoder's and the decoder's stacks share."""

    layer_class: type[nn.Module]

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(self.layer_class(config) for _ in range(config.n_layers))
        self.final_norm = (nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
                           if config.has_final_norm else None)
        self.apply(init_weights)

    @classmethod
    def from_torch(cls, stack: nn.Module) -> LayerStack:
        """A stack with exactly the weights of PyTorch's ``nn.TransformerEncoder`` (for an
        ``EncoderStack``) or ``nn.TransformerDecoder`` (for a ``DecoderStack``).

        Works whatever its ``batch_first`` (ctxvec is always batch-first) and for both norm
        orders. Variants ctxvec does not implement are refused by name.
        """
        from ctxvec.model.from_torch import stack_from_torch

        return stack_from_torch(cls, stack)


class EncoderStack(LayerStack):
    """N encoder layers applied in turn (12 in the seed), plus a final LayerNorm for pre-norm.

    Takes already-embedded input (B, T, D) and the public ``attention_mask`` (B, T).
    """

    layer_class = EncoderLayer

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False,
                positions: torch.Tensor | None = None, route: Route | None = None) -> EncoderOutput:
        """hidden_states: (B, T, D); attention_mask: (B, T), 1/True = real token.

        positions: optional (B, T) bool, the output positions wanted, True where an output
        vector is wanted (real tokens only; not to be confused with the position encoding,
        ``Embeddings.positions``). The output is then (M, D), ``full_output[positions]``, and the
        last layer runs its token-wise steps (out-projection, Add & Norm, feed-forward) at those
        rows only. ``positions`` equal to the attention mask (every real token) skips nothing:
        the output is then the real tokens' rows, text after text, as the route holds them
        (``Route.real_rows``; a pipeline pools from them without unpacking a padded batch).
        route: how to run (default: ``choose_route``, once for the whole stack).
        """
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3:
            raise ValueError("hidden_states must be a (batch, seq_len, d_model) tensor, got "
                             f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}.")
        if hidden_states.shape[-1] != self.config.d_model:
            raise ValueError(f"hidden_states has width {hidden_states.shape[-1]}, the stack "
                             f"expects d_model={self.config.d_model}.")
        real = check_attention_mask(attention_mask, tuple(hidden_states.shape[:2]), hidden_states.device)
        if route is None:
            route = choose_route(hidden_states, self, real)  # once for the whole stack
        elif not (bool(real.all()) if route.real is None
                  else route.real.shape == real.shape and torch.equal(route.real, real)):
            raise ValueError("route was made for another attention_mask; make it with this one "
                             "(Route(attention_mask.bool())).")
        description = route.describe() + ("; attention step by step: the probabilities are asked for"
                                          if output_attentions else "")
        log.debug("encoder route: %s", description)
        if positions is not None:
            self._check_positions(positions, real)
            if output_hidden_states:
                raise ValueError("positions and output_hidden_states cannot be combined: the last "
                                 "layer computes only the chosen positions.")
        every_real = positions is not None and torch.equal(positions, real)
        selected = route.selected_rows(positions) if positions is not None and not every_real else None
        check_finite(hidden_states, "hidden_states", self, real)
        x = route.arrange(hidden_states)  # (B, T, D) -> the layers' view of the tokens
        restore = route.real_rows if every_real else route.restore if selected is None else (lambda t: t)
        all_hidden = [hidden_states] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            out = layer(x, route.key_mask, output_attentions, route, selected if last else None)
            x = out.hidden_state
            if self.final_norm is not None and last:
                x = self.final_norm(x)
            if all_hidden is not None:
                all_hidden.append(restore(x))
            if all_attentions is not None:
                all_attentions.append(out.attention)
        check_finite(x, "the encoder's output", self)
        x = restore(x)
        if all_hidden is not None:
            all_hidden[-1] = x
        return EncoderOutput(
            last_hidden_state=x,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attentions=tuple(all_attentions) if all_attentions is not None else None,
            route=description,
        )

    @staticmethod
    def _check_positions(positions: torch.Tensor, real: torch.Tensor) -> None:
        """(B, T) bool output positions, real tokens only."""
        if not isinstance(positions, torch.Tensor) or positions.dtype != torch.bool:
            raise TypeError("positions must be a bool tensor, True where an output is wanted.")
        if positions.shape != real.shape or positions.device != real.device:
            raise ValueError(f"positions has shape {tuple(positions.shape)} on {positions.device}; it "
                             f"must match the input's (batch, seq_len) = {tuple(real.shape)} on {real.device}.")
        if bool((positions & ~real).any()):
            raise ValueError("positions marks a padding position; only real tokens have outputs.")


class Encoder(nn.Module):
    """The whole assembly line after tokenization: embed, add positions, run the stack.

    Example:
        >>> config = EncoderConfig(vocab_size=100, d_model=32, n_heads=4, d_ff=64, n_layers=2)
        >>> encoder = Encoder(config).eval()
        >>> ids = torch.tensor([[2, 15, 16, 3], [2, 17, 3, 0]])
        >>> mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
        >>> encoder(ids, mask).last_hidden_state.shape
        torch.Size([2, 4, 32])
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.stack = EncoderStack(config)
        self.embeddings.apply(init_weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, output_hidden_states: bool = False,
                output_attentions: bool = False, positions: torch.Tensor | None = None,
                route: Route | None = None) -> EncoderOutput:
        """input_ids, attention_mask, token_type_ids: (B, T). Returns an ``EncoderOutput``;
        with ``positions`` ((B, T) bool) only the vectors there, (M, D) (see ``EncoderStack``)."""
        check_token_ids(input_ids, self.config)
        if token_type_ids is not None:
            if self.embeddings.token_types is None:
                raise ValueError("token_type_ids given but this model has no segment embeddings.")
            if (not isinstance(token_type_ids, torch.Tensor) or not is_integer_tensor(token_type_ids)
                    or token_type_ids.shape != input_ids.shape):
                raise ValueError("token_type_ids must be an integer tensor shaped like input_ids.")
            if int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= self.config.type_vocab_size:
                raise ValueError(f"token_type_ids must lie in [0, {self.config.type_vocab_size}).")
        x = self.embeddings(input_ids, token_type_ids, route=route)  # (B, T, D)
        check_finite(x, "the embeddings", self.embeddings)
        return self.stack(x, attention_mask, output_hidden_states, output_attentions, positions, route)
