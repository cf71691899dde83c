"""The documents inside a packed window, as the model and the loss see them.

Windows run across document boundaries (data/loader.py); the end-of-document token (EOD) marks where one document
ends. Its id belongs to the dataset (256 for the byte-level fallback, the tokenizer's EOD for indexed datasets, or
`data.eod_id`), so it is passed in explicitly. Conventions, as in Megatron's `reset_attention_mask`,
`reset_position_ids` and `eod_mask_loss`:

- an EOD token is the last token of its document: it attends to its own document, and the token after it starts
  the next one (a window starting mid-document treats that part as a document of its own);
- reset positions restart at 0 on the token after each EOD (and at the window's first token);
- the masked loss drops the prediction made *at* an EOD input position, whose target is the next document's first
  token (`loss_mask[inputs == eod] = 0`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# F.cross_entropy's default ignore_index: a target with this value contributes no loss and is not counted.
IGNORE_INDEX = -100


def document_ids(inputs_BS: Tensor, eod_id: int) -> Tensor:
    """Position i's document within its row: the number of EOD tokens before i. [B, S] int64."""
    is_eod = (inputs_BS == eod_id).long()
    return is_eod.cumsum(dim=1) - is_eod


def document_positions(inputs_BS: Tensor, eod_id: int) -> Tensor:
    """Position of each token within its document: 0 at the window start and after every EOD. [B, S] int64."""
    B, S = inputs_BS.shape
    index = torch.arange(S, device=inputs_BS.device).expand(B, S)
    starts = torch.zeros_like(index)
    starts[:, 1:] = torch.where(inputs_BS[:, :-1] == eod_id, index[:, 1:], 0)
    return index - starts.cummax(dim=1).values


@dataclass(frozen=True)
class DocumentPacking:
    """What training does with the documents of a window (`data.document_mask`, `data.reset_position_ids`,
    `data.eod_mask_loss`)."""

    eod_id: int
    mask_attention: bool = False
    reset_positions: bool = False
    mask_loss: bool = False

    def model_inputs(self, inputs_BS: Tensor) -> dict[str, Tensor]:
        """The keyword inputs of `Decoder.forward` for these input tokens (the same on every pipeline stage)."""
        inputs: dict[str, Tensor] = {}
        if self.mask_attention:
            inputs["doc_ids_BS"] = document_ids(inputs_BS, self.eod_id)
        if self.reset_positions:
            inputs["position_ids_BS"] = document_positions(inputs_BS, self.eod_id)
        return inputs

    def targets(self, window_BS1: Tensor) -> Tensor:
        """Next-token targets of a [B, S+1] window, IGNORE_INDEX where the loss is masked."""
        targets = window_BS1[:, 1:]
        if not self.mask_loss:
            return targets
        return targets.masked_fill(window_BS1[:, :-1] == self.eod_id, IGNORE_INDEX)


def window_inputs(window_BS1: Tensor, documents: DocumentPacking | None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """A [B, S+1] token window -> (input tokens, targets, Decoder.forward's document inputs)."""
    inputs = window_BS1[:, :-1]
    if documents is None:
        return inputs, window_BS1[:, 1:], {}
    return inputs, documents.targets(window_BS1), documents.model_inputs(inputs)
