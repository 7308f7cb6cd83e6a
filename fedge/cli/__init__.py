"""`fedge`: one command, one subcommand per role (agent, hub, fleet, ...)."""

from __future__ import annotations

import argparse
import difflib
import sys

DESCRIPTION = """\
fedge - federated learning for edge devices over MQTT.

Roles:
  fedge fleet       simulate a whole fleet on this machine (the quickest way to see fedge work)
  fedge hub         the server on your home server: rounds, aggregation, persistence, evaluation
  fedge agent       a device (Raspberry Pi, Jetson, ...): trains on local data when selected
  fedge partition   split a dataset into per-device files for real agents
  fedge profiles    list, show or validate firmware profiles
  fedge models      the registered models, their task family and the options each takes
  fedge export      a run's model as ONNX (optionally int8) for torch-free devices
  fedge agent predict | serve   torch-free inference with ONNX Runtime
  fedge keys        hub signing key and per-device keys (models signed, updates authenticated)
  fedge acl         a Mosquitto ACL so each device may publish only under its own topics

Start here:  fedge fleet            (10 virtual devices, an in-process broker, Fashion-MNIST)
Then:        fedge <command> --help
"""


def _add_profiles_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profiles", help="list, show or validate firmware profiles",
                              description="Without arguments lists the built-in profiles; with names or YAML "
                                          "paths validates and prints each one.")
    p.add_argument("names", nargs="*", help="profile names or YAML files to validate and show")
    p.set_defaults(func=_run_profiles)


def _run_profiles(args: argparse.Namespace) -> int:
    import yaml  # noqa: PLC0415

    from fedge.edge_agent.profile import ProfileError, available_profiles, load_profile  # noqa: PLC0415

    if not args.names:
        for name in available_profiles():
            prof = load_profile(name)
            print(f"{name:12s} {prof.device:4s} {str(prof.model):8s} {prof.mode:5s} batch {prof.batch_size:<4d} "
                  f"{prof.memory_budget_mb:>6d} MiB  {prof.description}")
        return 0
    status = 0
    for name in args.names:
        try:
            print(yaml.safe_dump(load_profile(name).summary(), sort_keys=False).strip(), end="\n---\n")
        except ProfileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
    return status


def _add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list the registered models and the options each takes",
                              description="Each registered model: its task family, private tensors and options "
                                          "(set with --model NAME --model-option OPTION=VALUE, or `model_options` "
                                          "in a profile file).")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from fedge.models.registry import model_family, model_names, option_schema, private_patterns  # noqa: PLC0415

    for name in model_names():
        private = f", private {', '.join(private_patterns(name))}" if private_patterns(name) else ""
        print(f"{name} ({model_family(name).name}{private})")
        for option in option_schema(name):
            print(f"    {option.describe()}: {option.help}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fedge.cli.agent import add_agent_parser  # noqa: PLC0415
    from fedge.cli.hub import add_fleet_parser, add_hub_parser, add_partition_parser  # noqa: PLC0415
    from fedge.cli.security import add_acl_parser, add_keys_parser  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="fedge", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_fleet_parser(sub)
    add_hub_parser(sub)
    agent = add_agent_parser(sub)
    add_partition_parser(sub)
    _add_profiles_parser(sub)
    _add_models_parser(sub)
    add_keys_parser(sub)
    add_acl_parser(sub)
    _add_optional_commands(sub, agent)
    return parser


def _add_optional_commands(sub: argparse._SubParsersAction, agent: argparse.ArgumentParser) -> None:
    """ONNX export and torch-free inference live in their own module."""
    from fedge.cli import infer as infer_cli  # noqa: PLC0415

    agent_sub = agent.add_subparsers(dest="agent_command", metavar="ACTION", required=False,
                                     title="inference (torch-free)")
    infer_cli.add_predict_parser(agent_sub)
    infer_cli.add_serve_parser(agent_sub)
    infer_cli.add_export_parser(sub)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its subcommands here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


def check_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Refuse a misspelt --flag by name, with the closest real one. argparse alone would hand
    `fedge agent --devcie-id pi-x` the value to the agent's ACTION positional and answer
    "invalid choice: 'pi-x'", which never names the typo."""
    if not argv:
        return
    commands = _subparsers(parser)
    if argv[0] not in commands:
        return
    command, rest = commands[argv[0]], argv[1:]
    actions = _subparsers(command)
    for i, token in enumerate(rest):
        if token == "--":
            return
        if token in actions:  # a nested action (agent predict|serve) checks its own flags
            check_options(command, rest[i:])
            return
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        known = [o for o in command._option_string_actions if o.startswith("--")]  # noqa: SLF001
        if name in known or any(o.startswith(name) for o in known):
            continue  # exact, or an abbreviation argparse resolves (or calls ambiguous itself)
        shown = [o for o, a in command._option_string_actions.items()  # noqa: SLF001 - hidden aliases stay hidden
                 if o.startswith("--") and a.help != argparse.SUPPRESS]
        close = difflib.get_close_matches(name, shown, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        command.error(f"unrecognized option {name}{hint}; see {command.prog} --help")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    check_options(parser, argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from fedge.models.errors import FedgeError  # noqa: PLC0415

    # fedge's own errors and an unreachable broker, a missing file or a folder the user may not
    # write (e.g. --runs-dir /var/lib/fedge/runs before it was created for them) are the user's to
    # fix: one line and exit 2. Anything else (TypeError, KeyError, a ValueError from deep inside
    # a library...) is a bug and keeps its traceback.
    try:
        return int(args.func(args) or 0)
    except (FedgeError, ConnectionError, TimeoutError, FileNotFoundError, PermissionError) as exc:
        print(f"fedge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
