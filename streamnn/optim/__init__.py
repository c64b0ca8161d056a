"""Optimizers (:mod:`.optimizers`) and learning-rate schedules (:mod:`.schedules`)."""
from streamnn.optim.optimizers import OPTIMIZERS, Adam, GradientDescent, Momentum, Optimizer, RMSProp, make_optimizer
from streamnn.optim.schedules import FORMULAS, Schedule, make_schedule

__all__ = ["FORMULAS", "OPTIMIZERS", "Adam", "GradientDescent", "Momentum", "Optimizer", "RMSProp", "Schedule",
           "make_optimizer", "make_schedule"]
