"""Tools around the engine: the command line, the capacity planner and its GPU table, the API clients and the
embedded-default converter. They use the core; the core uses none of them but the default model's path."""
