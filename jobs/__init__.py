"""Entry points: the only things a user runs (`promptmill <command>`)."""
