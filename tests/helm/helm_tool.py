#!/usr/bin/env python3
"""Helm actions for tests/helm.rs, through the PyPI package helm-python-sdk
(import helm_python), which bundles Helm v4's Go SDK as a shared library: no
helm binary is needed.

    helm_tool.py lint CHART
    helm_tool.py render CHART --name N --namespace NS [--values JSON]
    helm_tool.py validate CHART [--values JSON]
    helm_tool.py install CHART --name N --namespace NS --kubeconfig F [--values JSON] [--skip-crds]
    helm_tool.py upgrade CHART --name N --namespace NS --kubeconfig F [--values JSON]
    helm_tool.py uninstall --name N --namespace NS --kubeconfig F [--ignore-not-found]
    helm_tool.py status --name N --namespace NS --kubeconfig F

Every command prints one JSON document on stdout: {"ok": ...} on success, or
{"error": {"type": ..., "message": ...}} (exit status 1) when Helm refused.
A missing helm-python-sdk exits with status 3 and says how to install it.
"""

import argparse
import json
import sys

try:
    import helm_python
    from helm_python import _native
except ImportError as e:  # a missing package is a test failure, with the fix
    print(
        f"helm-python-sdk is not installed ({e}); install it with "
        "`python3 -m pip install helm-python-sdk==0.2.2` (scripts/test.sh does)",
        file=sys.stderr,
    )
    sys.exit(3)


def emit(ok):
    json.dump({"ok": ok}, sys.stdout)
    sys.stdout.write("\n")


def install(cfg, args, values):
    """Config.install does not expose Helm's skip_crds option; the library's
    install entry point takes it in its options JSON, as the CLI's --skip-crds."""
    if not args.skip_crds:
        return cfg.install(args.chart, args.name, values, namespace=args.namespace, timeout=120)
    options = {"namespace": args.namespace, "timeout_seconds": 120, "skip_crds": True}
    payload = _native.call_string(
        "helm_install",
        cfg._raw(),
        _native.HANDLE(0),
        _native.HANDLE(0),
        args.chart,
        args.name,
        json.dumps(values),
        json.dumps(options),
    )
    return json.loads(payload)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["lint", "render", "validate", "install", "upgrade", "uninstall", "status", "version"])
    parser.add_argument("chart", nargs="?")
    parser.add_argument("--name")
    parser.add_argument("--namespace")
    parser.add_argument("--kubeconfig")
    parser.add_argument("--values", default="{}", help="values as JSON")
    parser.add_argument("--skip-crds", action="store_true")
    parser.add_argument("--ignore-not-found", action="store_true")
    args = parser.parse_args()
    values = json.loads(args.values)

    try:
        if args.command == "version":
            emit({"package": helm_python.__version__, "helm": helm_python.helm_sdk_version()})
        elif args.command == "lint":
            emit(helm_python.lint(args.chart, values or None, strict=True, namespace=args.namespace))
        elif args.command == "validate":
            with helm_python.Chart.load(args.chart) as chart:
                chart.validate_schema(values)
            emit(True)
        elif args.command == "render":
            with helm_python.Chart.load(args.chart) as chart:
                emit(chart.render(values, name=args.name, namespace=args.namespace, is_install=True))
        else:
            with helm_python.Config(kubeconfig_path=args.kubeconfig, namespace=args.namespace) as cfg:
                if args.command == "install":
                    emit(install(cfg, args, values))
                elif args.command == "upgrade":
                    emit(cfg.upgrade(args.chart, args.name, values, namespace=args.namespace, timeout=120))
                elif args.command == "uninstall":
                    emit(cfg.uninstall(args.name, timeout=120, ignore_not_found=args.ignore_not_found))
                elif args.command == "status":
                    emit(cfg.status(args.name))
    except helm_python.HelmError as e:
        json.dump({"error": {"type": type(e).__name__, "message": str(e)}}, sys.stdout)
        sys.stdout.write("\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
