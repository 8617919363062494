"""Ray Data glue for the generate job: read -> validate -> generate -> write -> commit (see ARCHITECTURE.md)."""
