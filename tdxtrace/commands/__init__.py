"""The CLI's commands, one module each; :data:`COMMANDS` is what ``tdxtrace`` offers."""

from __future__ import annotations

import click

from tdxtrace.commands.analyze import analyze_command
from tdxtrace.commands.demo import demo_command
from tdxtrace.commands.info import info_command
from tdxtrace.commands.plugins_cmd import plugins_command
from tdxtrace.commands.record import record_command
from tdxtrace.commands.replay_cmd import capsule_command, replay_command
from tdxtrace.commands.report_cmd import report_command
from tdxtrace.commands.scenarios_cmd import scenarios_command
from tdxtrace.commands.schema_cmd import schema_command

COMMANDS: list[click.Command] = [analyze_command, capsule_command, demo_command, info_command,
                                 plugins_command, record_command, replay_command,
                                 report_command, scenarios_command, schema_command]
