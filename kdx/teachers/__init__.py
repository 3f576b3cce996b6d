"""Teachers: frozen networks (from a checkpoint or the teacher store) and other soft-target sources."""
from kdx.teachers.base import Teacher
from kdx.teachers.network import NetworkTeacher
from kdx.teachers.store import TeacherStore

__all__ = ["NetworkTeacher", "Teacher", "TeacherStore"]
