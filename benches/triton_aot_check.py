"""Compile every kdfast Triton kernel for a CUDA target without a GPU; prints registers and spills.

    python benches/triton_aot_check.py                # sm_90 (H100), the launchers' usual variants
    python benches/triton_aot_check.py --arch 80      # another compute capability
    python benches/triton_aot_check.py --full         # more vocabularies, dtypes and k
    python benches/triton_aot_check.py -k topk -v     # only kernels matching 'topk', every variant
    TRITON_VENV/bin/python benches/triton_aot_check.py   # the same with another Triton version

The variants are the launchers' own: the launchers of :mod:`kdfast._triton.dense`, ``.sparse``
and ``.compress`` are called on ``meta`` tensors (no memory, no device; a device other than CPU,
so the compress launcher passes its CUDA options, ``enable_fp_fusion=False``) with each kernel's
``run`` replaced by a recorder. Every distinct recorded launch is then specialised by Triton's
own binder (pointer alignment, ints equal to 1 or divisible by 16, the constexprs, ``num_warps``
and the other options; the inputs include views 4 bytes off the 16-byte alignment and
vocabularies that are not multiples of 16) and compiled ahead of time with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` down to a cubin by the
``ptxas`` that Triton bundles. Registers, spills and stack come from that ``ptxas -v`` run
(``CompiledKernel.n_regs`` / ``n_spills`` need a device). Every variant is compiled afresh
(``TRITON_ALWAYS_COMPILE=1``, so that ptxas runs) into a temporary cache, or into
``TRITON_CACHE_DIR`` when that is set; ``TRITON_INTERPRET`` is ignored. It takes about 6 minutes
for the ~250 variants on two CPU cores.

Per kernel it prints the variants compiled and failed, the maximum registers, spill bytes and
shared memory; ``-v`` prints every variant. The exit status is 1 when a variant fails to compile,
or could not launch: more registers per block than an SM has (64K), more shared memory than the
target's (227 KiB on sm_90); with ``--fail-on-spill`` also when a variant spills.

What it cannot catch: run-time faults (out-of-bounds addresses, int32 overflow of offsets on
large tensors), wrong results, speed, and what differs on the real device (its driver, its
Triton's own ptxas); those need the CUDA tests (``benches/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import traceback
import warnings

# The interpreter replaces @triton.jit functions by interpreted ones when the modules load.
if os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0"):
    print("triton_aot_check: ignoring TRITON_INTERPRET (this compiles for the GPU)", file=sys.stderr)
# Every variant through ptxas (whose log gives the registers), in a cache of its own.
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
_CACHE = None
if "TRITON_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.TemporaryDirectory(prefix="triton_aot_check-")
    os.environ["TRITON_CACHE_DIR"] = _CACHE.name
# Triton 3.9 warns once that its FP-fusion default will change; the kernels are compiled with
# the default of the installed version, as at run time.
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

try:
    from kdfast._triton import compress, dense, sparse
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    from kdfast._triton import compress, dense, sparse

MODULES = (dense, sparse, compress)
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DEV = torch.device("meta")
MAX_REGS_PER_SM = 65536
MAX_SHARED = {90: 232448, 89: 101376, 86: 101376, 80: 166912, 75: 65536}  # bytes per block (opt-in)


# ----------------------------------------------------------------------------- the ptxas log


class _SubprocessShim:
    """Triton's CUDA backend runs ``ptxas -v`` with stderr to a temporary file it then deletes;
    this stand-in for its ``subprocess`` module keeps that log."""

    def __init__(self, real):
        self._real = real
        self.log = None

    def __getattr__(self, name):
        return getattr(self._real, name)

    def run(self, cmd, *args, **kwargs):
        result = self._real.run(cmd, *args, **kwargs)
        err = kwargs.get("stderr")
        if cmd and "ptxas" in os.path.basename(str(cmd[0])) and hasattr(err, "name"):
            with open(err.name) as f:
                self.log = f.read()
        return result


def _install_shim():
    from triton.backends.nvidia import compiler as nv

    shim = _SubprocessShim(nv.subprocess)
    nv.subprocess = shim
    return shim


def _parse_ptxas(log: str) -> dict:
    def grab(pattern):
        m = re.search(pattern, log or "")
        return int(m.group(1)) if m else None

    return {"regs": grab(r"Used (\d+) registers"), "spill_st": grab(r"(\d+) bytes spill stores"),
            "spill_ld": grab(r"(\d+) bytes spill loads"), "stack": grab(r"(\d+) bytes stack frame")}


# ----------------------------------------------------------------------------- recording launches


class Recorder:
    """Replaces each kernel's ``run`` (what ``kernel[grid](...)`` calls) by a recorder."""

    def __init__(self):
        self.kernels = {}
        self.calls = []
        self.case = None

    def install(self):
        for mod in MODULES:
            for name, obj in vars(mod).items():
                if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__:
                    self.kernels[f"{mod.__name__.rsplit('.', 1)[1]}.{name}"] = obj
        for qual, fn in self.kernels.items():
            fn.run = self._recording(qual, fn)
        # The compress launchers read a status computed by the kernel (one host sync): skip it.
        compress._raise_for_status = lambda *a, **k: None

    def _recording(self, qual, fn):
        def run(*args, grid, warmup, **kwargs):
            self.calls.append((qual, fn, args, kwargs, self.case))
        return run


def _t(shape, dtype):
    return torch.empty(shape, dtype=dtype, device=DEV)


def _view(n, v, dt, off):
    """``[n, v]`` logits; ``off > 0``: a view ``off`` columns into wider rows (unaligned base)."""
    return _t((n, v + off), dt)[:, off:] if off else _t((n, v), dt)


def _dtname(dt):
    return {F32: "f32", BF16: "bf16", F16: "f16"}[dt]


def drive_launchers(rec: Recorder, full: bool):
    """Call every launcher over the variants it has in use."""
    n = 4
    dtypes = (F32, BF16, F16)
    big = (151936, 50257, 32000) if full else (50257,)
    small = (4096, 2048, 1000, 512, 256, 100, 7) if full else (1000, 100)
    losses = (("forward_kl", 0.0), ("reverse_kl", 0.0), ("jsd", 0.5), ("skew_forward_kl", 0.1),
              ("skew_reverse_kl", 0.1), ("tvd", 0.0))

    # dense_call: every loss kind, dtype and block size, with and without the gradient.
    def dense_case(loss, param, sdt, tdt, v, need_grad, labels=True, gs_tensor=False, off=0):
        rec.case = f"{loss} s={_dtname(sdt)} t={_dtname(tdt)} V={v} grad={int(need_grad)}" \
                   f"{' labels' if labels else ''}{' gs_ptr' if gs_tensor else ''}{' unaligned' if off else ''}"
        s, t = _view(n, v, sdt, off), _view(n, v, tdt, off)
        lab = _t((n,), torch.int64) if labels else None
        gs = _t((), F32) if gs_tensor else 0.5
        grad = _t((n, v), sdt) if need_grad else None
        dense.dense_call(loss, param, s, t, lab, -100, 2.0, True, gs, _t((n,), F32), grad)

    for loss, param in losses:
        for dt in dtypes:
            for v in big + small:
                for need_grad in (True, False):
                    if need_grad or dt == F32:
                        dense_case(loss, param, dt, dt, v, need_grad)
        for sdt, tdt in ((BF16, F32), (F32, BF16)) + (((F16, BF16),) if full else ()):
            dense_case(loss, param, sdt, tdt, big[0], True)
        dense_case(loss, param, F32, F32, big[0], True, labels=False, gs_tensor=True)
        dense_case(loss, param, BF16, BF16, big[0], True, off=1)

    # scale_grad_: per-row factor (stride 1) or one scalar (stride 0).
    for dt in dtypes:
        for v in big[:1] + small:
            for per_row in (True, False):
                rec.case = f"g={_dtname(dt)} V={v} {'per-row' if per_row else 'scalar'}"
                dense.scale_grad_(_t((n, v), dt), _t((n,) if per_row else (), F32))

    # sparse_call: every mode, dtype and block size, small and large k (KC = 16 .. 1024).
    for mode, tail in (("bucket", True), ("bucket", False), ("renorm", False), ("sampled", False)):
        for dt in dtypes:
            for v, ks in [(b, (20, 1024)) for b in big] + [(b, (20, 300) if full else (20,)) for b in small]:
                for k in ks:
                    for need_grad in (True, False):
                        if not need_grad and dt != F32:
                            continue
                        rec.case = f"{mode}{'+tail' if tail else ''} s={_dtname(dt)} V={v} k={k} grad={int(need_grad)}"
                        sparse.sparse_call(
                            mode, _t((n, v), dt), _t((n, k), torch.int64), _t((n, k), F32),
                            _t((n, k), F32) if mode == "sampled" else None, _t((n,), F32) if tail else None,
                            _t((n,), torch.int64), -100, 2.0, True, 1.0, _t((n,), F32),
                            _t((n, v), dt) if need_grad else None)
        rec.case = f"{mode}{'+tail' if tail else ''} s={_dtname(dt)} V={big[0]} k=64 grad=1 unaligned"
        v = big[0]
        sparse.sparse_call(mode, _view(n, v, dt, 1), _t((n, 64), torch.int64), _t((n, 64), F32),
                           _t((n, 64), F32) if mode == "sampled" else None, _t((n,), F32) if tail else None,
                           None, -100, 1.0, False, _t((), F32), _t((n,), F32), _view(n, v, dt, 3))

    # sparse_call with sparse_loss's other losses (constexpr CAT): each mode's categories, every
    # dtype, one large and one small vocabulary, k = 20 and 1024.
    for mode, tail in (("bucket", True), ("bucket", False), ("renorm", False)):
        for loss, param in (("reverse_kl", 0.0), ("jsd", 0.5), ("tvd", 0.0)) + ((("jsd", 0.0),) if mode == "renorm" else ()):
            for dt in dtypes:
                for v, k in ((big[0], 20), (big[0], 1024), (small[-1], 20)):
                    rec.case = f"{mode}{'+tail' if tail else ''} {loss}({param}) s={_dtname(dt)} V={v} k={k}"
                    sparse.sparse_call(
                        mode, _t((n, v), dt), _t((n, k), torch.int64), _t((n, k), F32), None,
                        _t((n,), F32) if tail else None, _t((n,), torch.int64), -100, 2.0, True, 1.0,
                        _t((n,), F32), _t((n, v), dt), loss=loss, param=param)

    # compress_topk: K = 16 .. 1024 (k = 1 is specialised as a constant), BLOCK up to 1024.
    ks = (1, 5, 16, 50, 100, 200, 256, 500, 1000, 1024) if full else (1, 16, 50, 100, 256, 500, 1024)
    for dt in dtypes:
        for v in big + small:
            for k in ks:
                if k <= v:
                    rec.case = f"x={_dtname(dt)} V={v} k={k}"
                    compress.compress_topk(_t((n, v), dt), k, 2.0)
        rec.case = f"x={_dtname(dt)} V={big[0]} k=64 unaligned"
        compress.compress_topk(_view(n, big[0], dt, 1), 64, 2.0)

    # compress_sample: NBP (padded number of 4096-id blocks) 16 .. 256; n = 1 is a constant.
    vs = (4096, 50257, 151936, 262144, 1_000_000) if full else (4096, 50257, 151936, 1_000_000)
    for dt in dtypes:
        for v in vs:
            for ns in ((64, 1) if dt == F32 else (64,)):
                rec.case = f"x={_dtname(dt)} V={v} n={ns}"
                compress.compress_sample(_t((n, v), dt), ns, 2.0, 1234, 0)
        rec.case = f"x={_dtname(dt)} V={vs[1]} n=64 unaligned"
        compress.compress_sample(_view(n, vs[1], dt, 1), 64, 2.0, 1234, 0)
    rec.case = None


# ----------------------------------------------------------------------------- compiling


def compile_call(fn, args, kwargs, backend, target, shim):
    """Specialise like ``JITFunction.run`` and compile; the ptxas figures and shared memory."""
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    key = (fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
    return key, lambda: _compile(fn, signature, constexprs, attrs, options, target, shim)


def _compile(fn, signature, constexprs, attrs, options, target, shim):
    shim.log = None
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    info = _parse_ptxas(shim.log)  # None where no ptxas log was seen
    info["shared"] = kernel.metadata.shared
    info["warps"] = kernel.metadata.num_warps
    return info


def _regs_fit(regs, warps):
    """Whether ``warps`` warps of ``regs`` registers each fit one SM (allocation unit: 256 per warp)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    return per_warp * warps <= MAX_REGS_PER_SM


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90 (default 90)")
    ap.add_argument("--full", action="store_true", help="more vocabularies, dtypes and k per launcher")
    ap.add_argument("-k", dest="pattern", default="", help="only kernels whose name matches this regex")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every variant")
    ap.add_argument("--fail-on-spill", action="store_true", help="exit 1 when a variant spills registers")
    args = ap.parse_args(argv)

    target = GPUTarget("cuda", args.arch, 32)
    backend = make_backend(target)
    shim = _install_shim()
    rec = Recorder()
    rec.install()
    drive_launchers(rec, args.full)

    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}; "
          f"{len(rec.calls)} launches recorded")
    unique, cases = {}, {}
    for qual, fn, a, kw, case in rec.calls:
        if args.pattern and not re.search(args.pattern, qual):
            continue
        key, job = compile_call(fn, a, kw, backend, target, shim)
        if key not in unique:
            unique[key] = (qual, job)
            cases[key] = []
        cases[key].append(case)

    results = {}  # qual -> list of (variant, info | error)
    bad = 0
    max_shared = MAX_SHARED.get(args.arch, 49152)
    t_all = time.time()
    for key, (qual, job) in unique.items():
        variant = cases[key][0] + (f" (+{len(cases[key]) - 1} same)" if len(cases[key]) > 1 else "")
        t0 = time.time()
        try:
            info = job()
            info["time"] = time.time() - t0
            problems = []
            if info["regs"] is not None and not _regs_fit(info["regs"], info["warps"]):
                problems.append(f"{info['regs']} regs x {info['warps']} warps > 64K registers")
            if info["shared"] > max_shared:
                problems.append(f"shared {info['shared']} B > {max_shared} B")
            if args.fail_on_spill and (info["spill_st"] or info["spill_ld"]):
                problems.append("spills")
            info["problems"] = problems
            bad += bool(problems)
        except Exception as e:  # noqa: BLE001 - report it and go on
            info = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                    "trace": traceback.format_exc(), "time": time.time() - t0}
            bad += 1
        results.setdefault(qual, []).append((variant, info))
        if args.verbose or "error" in info or info.get("problems") or info.get("spill_st"):
            _print_variant(qual, variant, info, args.verbose)

    print(f"\n{len(unique)} variants compiled in {time.time() - t_all:.0f} s\n")
    print("| kernel | variants | failed | warps | max regs | max spill st/ld (B) | max stack (B) | max shared (B) |")
    print("|---|---|---|---|---|---|---|---|")
    helpers = []
    for qual in rec.kernels:
        rows = results.get(qual)
        if rows is None:
            if not any(q == qual for q, *_ in rec.calls):
                helpers.append(qual)
            continue
        ok = [i for _, i in rows if "error" not in i]

        def mx(field, ok=ok):
            vals = [i[field] for i in ok if i.get(field) is not None]
            return max(vals) if vals else "-"

        warps = ",".join(map(str, sorted({i["warps"] for i in ok})))
        print(f"| {qual} | {len(rows)} | {len(rows) - len(ok)} | {warps} | {mx('regs')} | "
              f"{mx('spill_st')}/{mx('spill_ld')} | {mx('stack')} | {mx('shared')} |")
    print(f"\n@triton.jit helpers, compiled inside the kernels: {', '.join(helpers)}")
    print(f"\n{'FAIL' if bad else 'OK'}: {bad} variant(s) failed or cannot launch")
    return 1 if bad else 0


def _print_variant(qual, variant, info, verbose):
    if "error" in info:
        print(f"FAILED  {qual} [{variant}]: {info['error']}")
        if verbose:
            print(info["trace"])
        return
    tag = "PROBLEM" if info["problems"] else ("SPILLS " if info.get("spill_st") else "ok     ")
    print(f"{tag} {qual} [{variant}] warps={info['warps']} regs={info['regs']} "
          f"spill={info['spill_st']}/{info['spill_ld']} stack={info['stack']} shared={info['shared']} "
          f"{info['time']:.1f}s {'; '.join(info['problems'])}")


if __name__ == "__main__":
    sys.exit(main())
