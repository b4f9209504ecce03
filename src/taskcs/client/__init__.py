"""The client side: the Client executor, task sets, task files and the cs-client CLI."""
