"""Run PEFT's own tests unpatched and patched (peftkern_patch_plugin) and compare every test's outcome.

    python scripts/peft_suite/compare.py --peft-src /tmp/peft-sdist/peft-0.21.2 \
        tests/test_mixed.py tests/test_custom_models.py -k lora

Arguments after the options go to pytest unchanged (test files relative to --peft-src, -k, ...). Exits 0
when both runs give the same outcome (passed/failed/error/skipped) for every test, else prints the
differences and exits 1. See README.md in this folder.
"""
import argparse
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent


def outcomes(junit: Path) -> dict[str, str]:
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        result[name] = ("failed" if "failure" in tags else "error" if "error" in tags
                        else "skipped" if "skipped" in tags else "passed")
    return result


def run(peft_src: Path, pytest_args: list[str], junit: Path, patched: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--junitxml={junit}", *(["-p", "peftkern_patch_plugin"] if patched else []), *pytest_args]
    print(("patched:   " if patched else "unpatched: ") + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=peft_src, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    tail = [line for line in lines if line.startswith("peftkern:")] + lines[-1:]
    print("\n".join("    " + line for line in tail), flush=True)
    if not junit.exists():
        sys.exit(f"pytest wrote no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return outcomes(junit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peft-src", type=Path, required=True, help="unpacked PEFT sdist (holds tests/)")
    parser.add_argument("--out", type=Path, default=Path("peft-suite-out"), help="folder for the junit reports")
    args, pytest_args = parser.parse_known_args()
    if not (args.peft_src / "tests").is_dir():
        parser.error(f"--peft-src {args.peft_src} has no tests/ folder (unpack PEFT's sdist there)")
    # the sdist leaves out tests/__init__.py, and test_custom_models.py imports its helpers relatively
    (args.peft_src / "tests" / "__init__.py").touch()
    args.out.mkdir(parents=True, exist_ok=True)
    plain = run(args.peft_src, pytest_args, args.out.resolve() / "unpatched.xml", patched=False)
    fused = run(args.peft_src, pytest_args, args.out.resolve() / "patched.xml", patched=True)
    counts = {k: sum(v == k for v in plain.values()) for k in ("passed", "failed", "error", "skipped")}
    print(f"{len(plain)} tests unpatched: {counts}")
    diffs = sorted((name, plain.get(name, "absent"), fused.get(name, "absent"))
                   for name in plain.keys() | fused.keys() if plain.get(name) != fused.get(name))
    for name, a, b in diffs:
        print(f"DIFFERENT {name}: unpatched {a}, patched {b}")
    print("same outcome for every test" if not diffs else f"{len(diffs)} tests differ")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
