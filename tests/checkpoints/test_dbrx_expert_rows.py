"""DBRX's experts stacked on the rows of one 2-D tensor (``ffn.experts.mlp.w1`` (E·ffn, d_model)) are read one
expert's rows at a time (``CheckpointSource.read_rows``: safetensors' ``get_slice(name)[start:stop]``), not the whole
tensor once per expert (E× the I/O and the NaN/Inf scan: 16 experts × 3 tensors × 40 layers on a real DBRX). The 3-D
``read_expert`` path (GraniteMoE's (E, out, in)) reads one expert's slice likewise. References: the elements the
safetensors handle hands out (a recording wrapper around ``safe_open``), float64 numpy of the stored rows (their
difference and its SVD), the planted per-expert updates, and for block-scaled FP8 a float64 block loop over the whole
stored tensor.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

from spectra.checkpoints.pairing import Pairing, PairingOptions
from spectra.checkpoints.quantized import fp8_spacing
from spectra.errors import NonFiniteWeightError
from tests.checkpoints.test_dbrx_experts_s20b import D, E, FFN, PLANTED, V1, W1, W2, expert_view, tiny_dbrx
from tests.models import planted_expert_pair, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

STACKED = [f"transformer.blocks.{i}.ffn.experts.mlp.{p}" for i in (0, 1) for p in ("w1", "v1", "w2")]


@pytest.fixture(scope="module")
def dbrx(tmp_path_factory):
    root = tmp_path_factory.mktemp("dbrx_rows")
    base = tiny_dbrx()
    tuned, b, t, deltas = planted_expert_pair(root, base, PLANTED, where=expert_view)
    return base, tuned, b, t, deltas


class _Slice:
    def __init__(self, inner, key, log):
        self._inner, self._key, self._log = inner, key, log

    def get_shape(self):
        return self._inner.get_shape()

    def get_dtype(self):
        return self._inner.get_dtype()

    def __getitem__(self, index):
        out = self._inner[index]
        self._log[self._key] += out.numel()
        return out


class _Handle:
    """A safe_open handle that counts the elements it hands out per (folder, tensor): the data read from the file."""

    def __init__(self, inner, folder, log):
        self._inner, self._folder, self._log = inner, folder, log

    def keys(self):
        return self._inner.keys()

    def get_tensor(self, name):
        out = self._inner.get_tensor(name)
        self._log[self._folder, name] += out.numel()
        return out

    def get_slice(self, name):
        return _Slice(self._inner.get_slice(name), (self._folder, name), self._log)


def _count_file_reads(monkeypatch) -> Counter:
    log: Counter = Counter()
    real = safetensors.safe_open

    def counted(path, *args, **kwargs):
        return _Handle(real(path, *args, **kwargs), Path(path).parent.name, log)

    monkeypatch.setattr(safetensors, "safe_open", counted)
    return log


def _stored64(folder, name) -> np.ndarray:
    return load_file(str(folder / "model.safetensors"))[name].double().numpy()


def _expert_delta64(b, t, name, e) -> np.ndarray:
    """Expert e's (out, in) ΔW from the stored rows, float64 numpy: rows e·ffn… (w2's transposed)."""
    rows = slice(e * FFN, (e + 1) * FFN)
    delta = _stored64(t, name)[rows] - _stored64(b, name)[rows]
    return delta.T if name.endswith("w2") else delta


def test_each_expert_record_reads_its_rows_alone(dbrx, monkeypatch):
    """Loading one expert's record reads that expert's ffn·d_model elements of the stored tensor from each side, no
    more (before: the whole E·ffn·d_model tensor per expert, E× per parameter); its ΔW is the float64 difference of
    the stored rows, the planted update where one was planted, else zero."""
    _, _, b, t, deltas = dbrx
    log = _count_file_reads(monkeypatch)
    pairing = Pairing(b, t, PairingOptions(include="experts", vectors=False, dtype="float64"))
    entries = [e for e in pairing.entries if e.expert_rows]
    assert len(entries) == len(STACKED) * E
    for entry in entries:
        log.clear()
        (record,) = pairing.load(entry)
        stored = entry.base_tensor
        assert dict(log) == {("b", stored): FFN * D, ("t", stored): FFN * D}, entry.name
        want = _expert_delta64(b, t, stored, entry.expert_index)
        np.testing.assert_allclose(record.delta.double().numpy(), want, rtol=0, atol=0, err_msg=entry.name)
        planted = deltas.get((stored, entry.expert_index))
        if planted is None:
            assert not want.any(), entry.name
        else:
            np.testing.assert_allclose(want, planted.numpy(), rtol=0, atol=2e-7, err_msg=entry.name)


def test_a_3d_expert_record_reads_its_slice_alone(tmp_path, monkeypatch):
    """GraniteMoE's (E, out, in) experts, read through read_expert: each expert's record reads out·in elements of the
    stored tensor per side, and its ΔW is the stored slice's float64 difference."""
    from tests.checkpoints.test_granitemoe_experts_s20fix import PLANTED as GRANITE, tiny_granitemoe

    _, b, t, _ = planted_expert_pair(tmp_path, tiny_granitemoe(), GRANITE)
    log = _count_file_reads(monkeypatch)
    pairing = Pairing(b, t, PairingOptions(include="block_sparse_moe", vectors=False, dtype="float64"))
    entries = [e for e in pairing.entries if e.expert_index is not None]
    assert len(entries) == 2 * 2 * 3
    for entry in entries:
        log.clear()
        records = pairing.load(entry)
        stored = entry.base_tensor
        shape = load_file(str(b / "model.safetensors"))[stored].shape
        assert dict(log) == {("b", stored): shape[1] * shape[2], ("t", stored): shape[1] * shape[2]}, entry.name
        want = _stored64(t, stored)[entry.expert_index] - _stored64(b, stored)[entry.expert_index]
        np.testing.assert_allclose(records[0].delta.double().numpy(), want, rtol=0, atol=0, err_msg=entry.name)


def test_analysis_rows_equal_a_whole_read_and_float64_svd_of_each_experts_rows(dbrx, tmp_path, monkeypatch):
    """analyze's record of every expert is the same read by rows as read whole and sliced (the former way), and its
    singular values equal numpy's float64 SVD of the stored rows' difference; a .bin pair (read whole, memory-mapped,
    and sliced) gives the same records."""
    from spectra.analysis import analyze
    from spectra.checkpoints.source import CheckpointSource

    base, tuned, b, t, _ = dbrx

    def experts(result):
        return {m["name"]: m for m in result.modules if ".ffn.experts.mlp." in m["name"]}

    by_rows = experts(analyze(b, t, cache_dir=False, progress=False))
    with monkeypatch.context() as m:
        m.setattr(CheckpointSource, "read_rows", lambda self, name, start, stop: self.read(name)[start:stop])
        whole = experts(analyze(b, t, cache_dir=False, progress=False))
    as_bin = experts(analyze(save(base, tmp_path / "b", "bin"), save(tuned, tmp_path / "t", "bin"), cache_dir=False,
                             progress=False))
    assert len(by_rows) == len(STACKED) * E
    volatile = {"seconds"}  # wall time
    for name, row in by_rows.items():
        same = {k: v for k, v in row.items() if k not in volatile}
        assert same == {k: v for k, v in whole[name].items() if k not in volatile}, name
        assert same == {k: v for k, v in as_bin[name].items() if k not in volatile}, name
    pairing = Pairing(b, t, PairingOptions(include="experts", vectors=False, dtype="float64"))
    for entry in (e for e in pairing.entries if e.expert_rows):
        (record,) = pairing.load(entry)
        want = np.linalg.svd(_expert_delta64(b, t, entry.base_tensor, entry.expert_index), compute_uv=False)
        got = torch.linalg.svdvals(record.delta).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=entry.name)
        if (entry.base_tensor, entry.expert_index) in PLANTED:
            assert by_rows[entry.name]["energy_rank"]["0.99"] == PLANTED[entry.base_tensor, entry.expert_index]


def test_a_nan_in_another_experts_rows_is_that_experts_alone(dbrx, tmp_path):
    """Negative control: a NaN planted in expert 0's rows of the tuned w1 skips expert 0's record, named by its rows,
    and leaves expert 1's (planted) and expert 2's records exact; without skip, loading expert 0 raises naming the
    rows, loading expert 1 does not."""
    _, _, b, _, deltas = dbrx
    state = load_file(str(b.parent / "t" / "model.safetensors"))
    state[W1][3, 5] = float("nan")  # row 3: expert 0's rows are 0…ffn
    (tmp_path / "t").mkdir()
    save_file(state, str(tmp_path / "t" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "t" / "config.json").write_text((b / "config.json").read_text())
    t = tmp_path / "t"
    pairing = Pairing(b, t, PairingOptions(include="blocks.0.ffn.experts", vectors=False, on_nonfinite="skip"))
    records = {r.name: r for r in pairing}
    head = W1.rpartition(".")[0]
    assert f"{head}.0.w1" not in records
    assert list(pairing.skipped_entries) == [f"{head}.0.w1"]
    assert pairing.skipped == [f"tensor {W1}[0:{FFN}] (expert 0's rows) in {t} holds 1 NaN/Inf value(s)"]
    np.testing.assert_allclose(records[f"{head}.1.w1"].delta.double().numpy(), deltas[W1, 1].numpy(), atol=2e-7)
    assert not records[f"{head}.2.w1"].delta.any()
    strict = Pairing(b, t, PairingOptions(include=r"re:blocks\.0\.ffn\.experts\.mlp\.\d\.w1", vectors=False))
    entries = {e.expert_index: e for e in strict.entries}
    assert strict.load(entries[1])[0].delta.abs().max() > 0
    with pytest.raises(NonFiniteWeightError, match=rf"{W1}\[0:{FFN}\] \(expert 0's rows\)"):
        strict.load(entries[0])


def _save_fp8_dbrx(model, folder, block):
    """`model` saved with DBRX's stacked experts in block-scaled FP8 (float32 scales, one per `block`, e4m3's 448 at
    the block's largest magnitude). Returns the folder and {tensor: (codes, scales)} as written."""
    state, written = {}, {}
    for name, p in model.state_dict().items():
        if name in STACKED:
            rows, cols = p.shape
            blocks = p.reshape(rows // block[0], block[0], cols // block[1], block[1])
            scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).float().contiguous()
            codes = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
            state[name], state[f"{name}_scale_inv"] = codes, scale
            written[name] = (codes, scale)
        else:
            state[name] = p.detach().clone().contiguous()
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict() | {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, written


def _blockwise64(codes, scales, block) -> np.ndarray:
    out = codes.double().numpy().copy()
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            out[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= float(scales[i, j])
    return out


@pytest.mark.parametrize("block", [(8, 16), (12, 16)], ids=["blocks within an expert", "blocks across experts"])
def test_fp8_stacked_experts_decode_and_spacing_per_expert(dbrx, tmp_path, monkeypatch, block):
    """Both sides block-scaled FP8: each expert's ΔW equals a float64 block loop over the whole stored tensor, sliced
    to its rows, and its grid spacing the whole tensor's, sliced. With blocks of 8 rows inside an expert's 16, only its
    codes' rows and its scales' rows are read; with blocks of 12 that straddle two experts, the tensor is decoded
    whole (read whole) and sliced."""
    base, tuned, _, _, _ = dbrx
    b, b_parts = _save_fp8_dbrx(base, tmp_path / "b", block)
    t, t_parts = _save_fp8_dbrx(tuned, tmp_path / "t", block)
    log = _count_file_reads(monkeypatch)
    pairing = Pairing(b, t, PairingOptions(include="experts", vectors=False, with_weights=True, dtype="float64"))
    entries = [e for e in pairing.entries if e.expert_rows]
    assert len(entries) == len(STACKED) * E
    for entry in entries:
        name, e = entry.base_tensor, entry.expert_index
        rows = slice(e * FFN, (e + 1) * FFN)
        log.clear()
        (record,) = pairing.load(entry)
        if block[0] == 8:  # the rows are read twice, for the values and for their grid's spacing
            scales = FFN // block[0] * (D // block[1])
            want_reads = {(side, n): 2 * count for side in ("b", "t")
                          for n, count in ((name, FFN * D), (f"{name}_scale_inv", scales))}
            assert dict(log) == want_reads, entry.name
        else:
            assert log[("b", name)] >= E * FFN * D  # decoded whole
        want = (_blockwise64(*t_parts[name], block) - _blockwise64(*b_parts[name], block))[rows]
        want = want.T if name.endswith("w2") else want
        largest = max(np.abs(_blockwise64(*parts[name], block)).max() for parts in (b_parts, t_parts))
        # float32 products code × scale against float64's: one rounding of each side
        np.testing.assert_allclose(record.delta.numpy(), want, rtol=0, atol=2 ** -23 * largest, err_msg=entry.name)
        for got, (codes, scales) in ((record.base_spacing, b_parts[name]), (record.tuned_spacing, t_parts[name])):
            spacing = fp8_spacing(codes, scales, block)[rows]
            torch.testing.assert_close(got, spacing.T if name.endswith("w2") else spacing, rtol=0, atol=0)
    assert V1 in STACKED and W2 in STACKED


def test_row_reads_name_the_tensor_and_rows_that_fail(dbrx):
    """Rows outside the tensor are refused naming it, its shape and the rows; a slice the file cannot give is
    reported naming the file, the tensor and the rows (here the handle fails as a truncated file's would)."""
    from spectra.checkpoints.source import open_checkpoint
    from spectra.errors import CheckpointError

    _, _, b, _, _ = dbrx
    source = open_checkpoint(b)
    assert torch.equal(source.read_rows(W1, FFN, 2 * FFN), source.read(W1)[FFN:2 * FFN])
    with pytest.raises(CheckpointError, match=rf"{W1}.*\({E * FFN}, {D}\): no rows {E * FFN}:{(E + 1) * FFN}"):
        source.read_rows(W1, E * FFN, (E + 1) * FFN)
    reader = source._reader(source.info(W1).file)

    class Broken:
        def get_slice(self, name):
            raise OSError("unexpected end of file")

    reader._handle = Broken()
    with pytest.raises(CheckpointError, match=rf"cannot read rows {FFN}:{2 * FFN} of tensor '{W1}' from "
                                              rf".*model.safetensors: unexpected end of file\. The file may be "
                                              "truncated"):
        source.read_rows(W1, FFN, 2 * FFN)
