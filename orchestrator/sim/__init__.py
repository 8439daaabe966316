"""A discrete-event simulator of many instances that runs the real policies and the real batch scheduler."""
