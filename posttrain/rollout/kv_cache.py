"""A KV cache preallocated for the whole generation, whose rows can be dropped.

Hugging Face's `DynamicCache` grows by `torch.cat` at every step, copying the whole cache of
every layer each time; this one writes the new keys and values in place into buffers sized for
prompt + completion once, and hands the model views of the filled part. Rows are dropped with
one `index_select` per layer when completions finish, so finished rows cost nothing afterwards.

Layout of every row: columns [0, prompt_width) hold the prompt right-aligned (left padding
first, masked by the caller), then one column per fed-back completion token.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _BufferLayer(DynamicLayer):
    """One decoder layer's keys and values in (rows, kv_heads, capacity, head_dim) buffers,
    allocated on first use so their head counts, head sizes and dtype come from the model."""

    def __init__(self, rows: int, capacity: int, length: int) -> None:
        super().__init__()
        self.rows, self.capacity, self.length = rows, capacity, length
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def allocate_like(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.key_buffer is not None:
            return
        # Zeros, not `empty`: masked padding columns must hold finite numbers, since attention
        # multiplies their values by a zero weight and 0 * NaN is NaN.
        self.key_buffer = keys.new_zeros((self.rows, keys.shape[1], self.capacity, keys.shape[3]))
        self.value_buffer = values.new_zeros(
            (self.rows, values.shape[1], self.capacity, values.shape[3])
        )
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._refresh_views()

    def _refresh_views(self) -> None:
        # `keys`/`values` are what Cache users read (e.g. `Cache.batch_size`); keep them the
        # filled part so the layer looks like a DynamicLayer from outside.
        assert self.key_buffer is not None and self.value_buffer is not None
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.allocate_like(key_states, value_states)
        assert self.key_buffer is not None and self.value_buffer is not None
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV buffer of {self.capacity} positions is full")
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
        if self.key_buffer is None or self.value_buffer is None:
            self.rows = indices.numel()
            return
        self.key_buffer = self.key_buffer.index_select(0, indices)
        self.value_buffer = self.value_buffer.index_select(0, indices)
        self._refresh_views()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("RowCache does not crop")


class RowCache(Cache):
    """A `Cache` over preallocated buffers of `rows` x `capacity` positions per layer.

    It starts with `prompt_width - 1` columns filled (by `write_packed`, or left empty when every
    prompt is one token long): the last prompt token of every row is fed as the first step.
    """

    def __init__(self, num_layers: int, rows: int, prompt_width: int, capacity: int) -> None:
        layers = [_BufferLayer(rows, capacity, prompt_width - 1) for _ in range(num_layers)]
        super().__init__(layers=layers)

    def write_packed(
        self, packed: Cache, source_index_TC: torch.Tensor, target_rows_T: torch.Tensor
    ) -> None:
        """Copy prompt keys/values out of a packed prefill into the first C columns.

        packed: the cache of a forward over (P, W) packed rows, several prompts per row.
        source_index_TC: for each of T buffer rows and each column c < C, the flat position
            (packed_row * W + offset) whose keys go there; padding columns may point anywhere,
            as they are masked. target_rows_T: the buffer rows filled, (T,).
        """
        columns = source_index_TC.shape[1]
        flat_index = source_index_TC.reshape(-1)
        for layer, source in zip(self.layers, packed.layers, strict=True):
            layer.allocate_like(source.keys, source.values)
            for buffer, states in (
                (layer.key_buffer, source.keys),
                (layer.value_buffer, source.values),
            ):
                assert buffer is not None
                heads, head_dim = states.shape[1], states.shape[3]
                # (P, heads, W, d) -> (P * W, heads, d): one gather picks every row's prompt.
                flat = states.transpose(1, 2).reshape(-1, heads, head_dim)
                gathered = flat.index_select(0, flat_index).view(-1, columns, heads, head_dim)
                buffer[:, :, :columns].index_copy_(0, target_rows_T, gathered.transpose(1, 2))
            layer._refresh_views()
