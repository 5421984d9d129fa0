#!/bin/sh
# The images' entrypoint, under tini. With no arguments, or options only, it runs the worker:
#   docker run ... airflow-outpost:cpu                        -> outpost worker
#   docker run ... airflow-outpost:cuda --exit-when-idle 15m  -> outpost worker --exit-when-idle 15m
# A subcommand runs as given:
#   docker exec <container> outpost-entrypoint status         -> outpost status
set -eu
case "${1:-}" in
  "" | -*) exec outpost worker "$@" ;;
  *) exec outpost "$@" ;;
esac
