"""The user's own module of the code-travels tests: copied into a project directory that the
workers (a peer server, an engine) cannot read, so they must get its code by value."""
import math


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def norm(self):
        return math.hypot(self.x, self.y)


def norm(p):
    return p.norm()


def scaled(p, k):
    return Point(p.x * k, p.y * k)
