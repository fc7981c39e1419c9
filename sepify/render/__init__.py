"""Renderers: every output format of every command (table, json, csv, markdown, junit, github).

Renderers take a report's ``to_dict()`` form, so a saved JSON renders the same as a fresh run.
Engines (analysis, rewrite, check, diff) never import this package; the CLI does.
"""
