"""aegis.v1.DoctorService: the daemon's checks of itself, for `aegisctl doctor`."""

from __future__ import annotations

from typing import Any

import grpc

from aegisd import __version__
from aegisd.api.aegis.v1 import doctor_pb2 as pb
from aegisd.api.aegis.v1 import doctor_pb2_grpc
from aegisd.control.errors import rpc
from aegisd.doctor import FAIL, PASS, SKIP, WARN, Doctor
from aegisd.runtime import Runtime

Ctx = grpc.aio.ServicerContext[Any, Any]
STATUS = {PASS: pb.CHECK_STATUS_PASS, WARN: pb.CHECK_STATUS_WARN, FAIL: pb.CHECK_STATUS_FAIL,
          SKIP: pb.CHECK_STATUS_SKIP}


class DoctorService(doctor_pb2_grpc.DoctorServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.doctor = Doctor(runtime)

    @rpc
    async def Diagnose(self, request: pb.DiagnoseRequest, context: Ctx) -> pb.DiagnoseResponse:
        checks = await self.doctor.diagnose()
        return pb.DiagnoseResponse(version=__version__, checks=[
            pb.Check(name=c.name, status=STATUS[c.status], message=c.message, hint=c.hint) for c in checks])
