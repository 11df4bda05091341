"""TrainingService: Train, GetTrainingJob, ListTrainingJobs, CancelTrainingJob, WatchTrainingJob.

A stream is one watcher of a job: when the client goes away the stream stops and the job goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses

from loraserve.core.errors import InvalidArgument
from loraserve.server.service import training_convert as convert
from loraserve.server.service.auth import caller
from loraserve.server.training.jobs import JOB_ID_RE, TrainingJobs, check_job_id
from loraserve.v1 import training_pb2, training_pb2_grpc

DEFAULT_PAGE = 1000


class TrainingService(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, jobs: TrainingJobs):
        self.jobs = jobs

    async def Train(self, request, context):
        spec = dataclasses.replace(convert.train_request_of(request), owner=caller.get())
        # Validation reads and tokenizes the data set: off the event loop, and all before the job exists.
        job = await asyncio.to_thread(self.jobs.submit, spec)
        async for event in job.events.follow():
            yield training_pb2.TrainResponse(event=convert.event_pb(event))

    async def GetTrainingJob(self, request, context):
        job = self.jobs.job(request.job_id)
        return training_pb2.GetTrainingJobResponse(job=convert.job_pb(self.jobs.snapshot(job)))

    async def ListTrainingJobs(self, request, context):
        if request.page_token and not JOB_ID_RE.fullmatch(request.page_token):
            raise InvalidArgument(f"page_token {request.page_token!r} is malformed")
        records, more = self.jobs.list(convert.state_of(request.state), request.page_token,
                                       request.page_size or DEFAULT_PAGE)
        return training_pb2.ListTrainingJobsResponse(jobs=[convert.job_pb(r) for r in records],
                                                     next_page_token=records[-1].job_id if more else "")

    async def CancelTrainingJob(self, request, context):
        # Saving a queued job's record touches the disk: off the event loop.
        job = await asyncio.to_thread(self.jobs.cancel, check_job_id(request.job_id))
        await job.events.wait_ended()  # a running job stops at its next micro-batch
        return training_pb2.CancelTrainingJobResponse(job=convert.job_pb(self.jobs.snapshot(job)))

    async def WatchTrainingJob(self, request, context):
        job = self.jobs.job(request.job_id)
        async for event in job.events.follow():
            yield training_pb2.WatchTrainingJobResponse(event=convert.event_pb(event))
