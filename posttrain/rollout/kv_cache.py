"""A KV cache preallocated for the whole generation, whose rows can be dropped.

Hugging Face's `DynamicCache` grows by `torch.cat` at every step, copying the whole cache of
every layer each time; this one writes the new keys and values in place into buffers sized for
prompt + completion once, and hands the model views of the filled part. Rows are dropped with
one `index_select` per layer when completions finish, so finished rows cost nothing afterwards.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _BufferLayer(DynamicLayer):
    """One decoder layer's keys and values in (rows, kv_heads, capacity, head_dim) buffers."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.key_buffer, self.value_buffer, self.length = keys, values, length
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device
        self._refresh_views()

    def _refresh_views(self) -> None:
        # `keys`/`values` are what Cache users read (e.g. `Cache.batch_size`); keep them the
        # filled part so the layer looks like a DynamicLayer from outside.
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            raise RuntimeError(f"KV buffer of {self.key_buffer.shape[-2]} positions is full")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._refresh_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer = self.key_buffer.index_select(0, indices)
        self.value_buffer = self.value_buffer.index_select(0, indices)
        self._refresh_views()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("RowCache does not crop")


class RowCache(Cache):
    """A `Cache` over preallocated buffers, filled from prefilled prompt caches.

    Positions [0, prompt_width) hold the prompts, left-padded to the longest one (padding is
    masked by the caller); completions are written from prompt_width on, one column per step.
    """

    def __init__(
        self,
        num_layers: int,
        rows: int,
        kv_heads: int,
        head_dim: int,
        prompt_width: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (rows, kv_heads, capacity, head_dim)
        layers = [
            # Zeros, not `empty`: masked padding positions must hold finite numbers, since
            # attention multiplies their values by a zero weight and 0 * NaN is NaN.
            _BufferLayer(
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
                prompt_width,
            )
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)
        self.prompt_width = prompt_width

    def write_prompts(
        self, prefilled: Cache, source_rows: torch.Tensor, target_rows: torch.Tensor
    ) -> None:
        """Copy rows of a prefilled prompt cache into the buffers, right-aligned at prompt_width.

        prefilled: a cache of B prompts left-padded to width W <= prompt_width.
        source_rows, target_rows: (R,) a row of `prefilled` for each buffer row it fills; one
        prompt row fills the n rows of its samples, so the n samples share one prefill.
        """
        for layer, source in zip(self.layers, prefilled.layers, strict=True):
            width = source.keys.shape[-2]
            start = self.prompt_width - width
            layer.key_buffer[:, :, start : self.prompt_width].index_copy_(
                0, target_rows, source.keys.index_select(0, source_rows)
            )
            layer.value_buffer[:, :, start : self.prompt_width].index_copy_(
                0, target_rows, source.values.index_select(0, source_rows)
            )
