"""The Hydra stack: tri-path blocks on an SSM backbone, a workspace and a PKM.

Every block is pre-norm and computes

    y = x + g_ssm * SSM(n(x)) + g_sga * SGA(n(x)) + g_moe * MoE(n(x))

with per-token gates from a small controller (absent paths contribute
nothing). The workspace follows block ``ws_after``, the PKM block ``pkm_after``.

Two forms: ``forward`` runs a whole sequence in parallel (training);
``step`` advances an explicit state by 1..chunk tokens (decoding, and the form
that export lowers). ``step`` is ``head`` (up to the PKM lookup), the PKM read,
then ``tail``; the bundle exports ``head`` and ``tail`` as two graphs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import HydraConfig, hydra_state_spec
from ..errors import UsageError
from .moe import ChunkMoE
from .norm import RMSNorm
from .pkm import ProductKeyMemory
from .sga import SparseGlobalAttention
from .ssm import Mamba2
from .workspace import Workspace

State = dict[str, torch.Tensor]


class HydraBlock(nn.Module):
    def __init__(self, cfg: HydraConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ssm = Mamba2(cfg)
        self.sga = SparseGlobalAttention(cfg) if cfg.has_sga(index) else None
        self.moe = ChunkMoE(cfg) if cfg.has_moe(index) else None
        n_paths = 1 + (self.sga is not None) + (self.moe is not None)
        self.controller = nn.Linear(cfg.d_model, n_paths)
        self._gate_bias = [cfg.gate_bias_ssm] + [cfg.gate_bias_aux] * (n_paths - 1)

    def reset_controller(self) -> None:
        """Start the SSM gate open and the SGA and MoE gates nearly shut (LayerScale-style)."""
        nn.init.normal_(self.controller.weight, std=0.02)
        with torch.no_grad():
            self.controller.bias.copy_(torch.tensor(self._gate_bias))

    def state_names(self) -> list[str]:
        i = self.index
        names = [f"layer{i}.conv_state", f"layer{i}.ssm_state"]
        if self.sga is not None:
            names += [f"layer{i}.{n}" for n in ("k_cache", "v_cache", "k_global", "v_global", "k_pool", "v_pool")]
        if self.moe is not None:
            names += [f"layer{i}.route_logits", f"layer{i}.route_input_sum"]
        return names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        gates = torch.sigmoid(self.controller(h))  # (B, T, n_paths)
        y = x + gates[..., 0:1] * self.ssm(h)
        aux = x.new_zeros(())
        path = 1
        if self.sga is not None:
            y = y + gates[..., path:path + 1] * self.sga(h)
            path += 1
        if self.moe is not None:
            moe_out, aux = self.moe(h)
            y = y + gates[..., path:path + 1] * moe_out
        return y, aux

    def step(self, x: torch.Tensor, pos: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        i = self.index
        h = self.norm(x)
        gates = torch.sigmoid(self.controller(h))
        ssm_out, conv_state, ssm_state = self.ssm.step(h, state[f"layer{i}.conv_state"], state[f"layer{i}.ssm_state"])
        new: State = {f"layer{i}.conv_state": conv_state, f"layer{i}.ssm_state": ssm_state}
        y = x + gates[..., 0:1] * ssm_out
        path = 1
        if self.sga is not None:
            names = self.state_names()[2:8]
            out, *sga_state = self.sga.step(h, pos, *(state[n] for n in names))
            new.update(zip(names, sga_state))
            y = y + gates[..., path:path + 1] * out
            path += 1
        if self.moe is not None:
            names = [f"layer{i}.route_logits", f"layer{i}.route_input_sum"]
            out, *moe_state = self.moe.step(h, pos, *(state[n] for n in names))
            new.update(zip(names, moe_state))
            y = y + gates[..., path:path + 1] * out
        return y, new


class Hydra(nn.Module):
    def __init__(self, cfg: HydraConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(HydraBlock(cfg, i) for i in range(cfg.n_layer))
        self.workspace = Workspace(cfg)
        self.pkm = ProductKeyMemory(cfg)
        self.norm_f = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            block.reset_controller()

    # -- parallel form ------------------------------------------------------

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """idx: (B, T) token ids -> logits (B, T, V) and the summed load-balancing loss."""
        x = self.embed(idx)
        aux = x.new_zeros(())
        for i, block in enumerate(self.blocks):
            x, block_aux = block(x)
            aux = aux + block_aux
            if i == self.cfg.ws_after and "workspace" not in self.cfg.ablate:
                x = self.workspace(x)
            if i == self.cfg.pkm_after and "pkm" not in self.cfg.ablate:
                x = self.pkm(x)
        return self.logits(x), aux

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # the output head is tied to the embedding
        return torch.matmul(self.norm_f(x), self.embed.weight.t())

    # -- recurrent form -----------------------------------------------------

    def state_names(self, part: str = "all") -> list[str]:
        """Names of the state tensors used by ``head``, ``tail`` or both ("all")."""
        cfg = self.cfg
        names_by_block = []
        for i, block in enumerate(self.blocks):
            names = block.state_names()
            if i == cfg.ws_after:
                names += ["workspace.slots", "workspace.write_sum", "workspace.write_mass"]
            names_by_block.append(names)
        head = [n for names in names_by_block[: cfg.pkm_after + 1] for n in names]
        tail = [n for names in names_by_block[cfg.pkm_after + 1:] for n in names]
        return {"head": head, "tail": tail, "all": head + tail}[part]

    def init_state(self, batch: int = 1) -> State:
        """Allocate the state of a new stream: position 0 and all zeros.

        At position 0 the model substitutes its learned initial workspace slots
        and route; every other tensor must be zero there, as here.
        """
        device = self.embed.weight.device
        state = {t.name: torch.zeros(t.shape, device=device) for t in hydra_state_spec(self.cfg, batch)}
        for block in self.blocks:
            if block.moe is not None:  # a pinned MoE has fewer experts than the config
                state[f"layer{block.index}.route_logits"] = torch.zeros(batch, block.moe.n_experts, device=device)
        state["pos"] = torch.zeros((), dtype=torch.long, device=device)
        return state

    def _run_blocks(self, x, pos, state: State, first: int, last: int) -> tuple[torch.Tensor, State]:
        new: State = {}
        for i in range(first, last):
            x, block_state = self.blocks[i].step(x, pos, state)
            new.update(block_state)
            if i == self.cfg.ws_after:
                names = ["workspace.slots", "workspace.write_sum", "workspace.write_mass"]
                if "workspace" in self.cfg.ablate:
                    new.update((n, state[n]) for n in names)
                    continue
                x, *ws_state = self.workspace.step(x, pos, *(state[n] for n in names))
                new.update(zip(names, ws_state))
        return x, new

    def head(self, tokens: torch.Tensor, pos: torch.Tensor, state: State):
        """Blocks up to the PKM and its lookup: -> hidden (B, T, D), rows (B, T, k), weights, new state."""
        x, new = self._run_blocks(self.embed(tokens), pos, state, 0, self.cfg.pkm_after + 1)
        rows, weights = self.pkm.lookup(x)
        return x, rows, weights, new

    def tail(self, hidden: torch.Tensor, pos: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """hidden (B, T, D) with the PKM read added -> logits (B, T, V) and new state."""
        x, new = self._run_blocks(hidden, pos, state, self.cfg.pkm_after + 1, self.cfg.n_layer)
        return self.logits(x), new

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens: (B, T) with 1 <= T and no chunk boundary crossed -> logits (B, T, V), new state."""
        t = tokens.shape[1]
        pos = state["pos"]
        offset = int(pos) % self.cfg.chunk
        if t < 1 or offset + t > self.cfg.chunk:
            raise UsageError(
                f"step got {t} tokens at chunk offset {offset}; a call takes 1 to "
                f"{self.cfg.chunk - offset} tokens so that it ends at or before the chunk boundary"
            )
        hidden, rows, weights, head_state = self.head(tokens, pos, state)
        if "pkm" not in self.cfg.ablate:
            hidden = hidden + self.pkm.read(rows, weights, self.pkm.values)
        logits, tail_state = self.tail(hidden, pos, state)
        return logits, {**head_state, **tail_state, "pos": pos + t}
