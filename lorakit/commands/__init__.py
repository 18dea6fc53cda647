"""The commands, one module each: `lorakit <command>` calls the function of the same name.

A command imports the libraries below it (lorakit.*), never another command.
"""
