"""gpu_check.py child (run with -c; argv[1]: JSON args with ``mode``): ``probe`` reports what
this interpreter has (torch build, CUDA device, cuEquivariance, the project's imports) and
the parameters of ``configs`` (with their fields); ``bf16`` evaluates named models in fp32
and, with the same weights, in bf16, and reports how far their forces differ. One
``RESULT {json}`` line either way."""

import copy, importlib.metadata, importlib.util, json, sys
a = json.loads(sys.argv[1])


def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe():
    import torch
    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "packages": {p: version(p) for p in ("e3nn", "ase", "vesin", "cuequivariance-torch",
                                                 "cuequivariance-ops-torch-cu12",
                                                 "cuequivariance-ops-torch-cu13", "mace-torch")},
           "missing_imports": []}
    try:  # the root cause when the ops' own library cannot load (it names what is missing)
        import ctypes, os
        import cuequivariance_ops
        ctypes.CDLL(os.path.join(cuequivariance_ops.root_dir(), "lib", "libcue_ops.so"))
    except ImportError:
        pass
    except OSError as e:
        out["ops_lib_error"] = str(e)[:300]
    try:  # installed is not enough: its CUDA library (cuequivariance-ops-cu*) must load
        import cuequivariance_ops_torch  # noqa: F401
        out["ops_importable"] = True
    except Exception as e:  # noqa: BLE001 - any failure to load is the answer
        out["ops_importable"], out["ops_error"] = False, f"{type(e).__name__}: {e}"[:300]
    for module in ("ase", "vesin", "e3nn", "yaml"):  # what models/ and the collate need
        if importlib.util.find_spec(module) is None:
            out["missing_imports"].append(module)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                         "memory_gib": p.total_memory / 2**30, "sms": p.multi_processor_count,
                         "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    try:  # the project's own check, where its imports are there
        from models.layers import cueq
        out["cueq_available_cuda"] = cueq.available("cuda") and out["ops_importable"]
        out["params"] = params()
    except ImportError as e:
        out["project_import_error"] = str(e)
    return out


def bf16_forces():
    import ase.io
    import torch
    from data_pipeline.batch import atoms_batch, to_torch
    from common.config import load_config
    from models.build import ModelConfig, build_model
    torch.set_num_threads(a["threads"])
    frames = ase.io.read(a["structures"], index=":")
    rows = {}
    for name, path in a["configs"].items():
        cfg = load_config(ModelConfig, path)
        torch.manual_seed(0)
        model = build_model(cfg, ["bench"]).to(a["device"]).eval()
        batch = {k: v.to(a["device"]) for k, v in
                 to_torch(atoms_batch(frames, cfg.cutoff, 0, "float32")).items()}
        low = copy.deepcopy(model)
        for part in low.children():  # as the engine's bf16: not the float64 references
            part.to(torch.bfloat16)
        ref, got = (m(batch, forces=True, create_graph=False) for m in (model, low))
        f32, f16 = ref["forces"].detach().double(), got["forces"].detach().double()
        n = len(batch["numbers"])
        rows[name] = {
            "force_rel_rms": float((f16 - f32).pow(2).mean().sqrt() / f32.pow(2).mean().sqrt()),
            "force_rms_fp32": float(f32.pow(2).mean().sqrt()),
            "force_max_abs_diff": float((f16 - f32).abs().max()),
            "energy_per_atom_abs_diff": float((got["energy"] - ref["energy"]).abs().sum() / n),
            "atoms": n, "kernels": cfg.kernels}
    return {"device": a["device"], "models": rows}


def params():
    import dataclasses
    from common.config import load_config
    from models.build import ModelConfig, build_model
    out = {}
    for name, path in a["configs"].items():
        cfg = load_config(ModelConfig, path)
        out[name] = {"params": sum(p.numel() for p in build_model(cfg, ["bench"]).parameters()),
                     "config": dataclasses.asdict(cfg)}
    return out


MODES = {"probe": probe, "bf16": bf16_forces}
print("RESULT " + json.dumps(MODES[a["mode"]]()))
