//! The image step: the first step of a job with `image: {build: ...}`. It finds the image of
//! the context's key on the engine (ImageReused) or builds it (the builder's output is the
//! step's one line's output; ImageBuilt), prunes the project's older images, and gives the
//! executor the tag to run the job's own steps in. Its events are a step's: StepStarted,
//! LineStarted, LogChunk, LineExited, StepFinished.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tributary_proto::events::envelope::Payload;
use tributary_proto::events::{
    ImageBuilt, ImagePruned, ImageReused, LineExited, LineStarted, Status, StepFinished,
    StepStarted,
};

use crate::container::ContainerRuntime;
use crate::image::context::BuildContext;
use crate::image::{
    dockerfile, key, prune, LABEL_BUILT_US, LABEL_KEY, LABEL_PROJECT, LABEL_TENANT,
};
use crate::sink::{Sink, STDOUT};
use crate::JobContext;

/// Longest builder message kept in a job's failure reason.
const MAX_REASON: usize = 600;

/// How the step ended when the job cannot go on.
pub(crate) struct Failed {
    pub status: Status,
    pub exit_code: i32,
    pub reason: String,
}

/// Runs the image step (step 0). Ok: the image's tag.
pub(crate) async fn run(
    ctx: &JobContext,
    sink: &mut Sink,
    deadline: Option<Instant>,
    cancel: &CancellationToken,
) -> Result<String, Failed> {
    let started = Instant::now();
    let (job, attempt) = (sink.job.clone(), sink.attempt);
    let plan = ctx.job.steps.first();
    sink.step = 0;
    sink.send(Payload::StepStarted(StepStarted {
        job: job.clone(),
        attempt,
        step: 0,
        name: plan.map_or_else(|| "image".to_owned(), |s| s.name.clone()),
    }))
    .await;
    sink.send(Payload::LineStarted(LineStarted {
        job: job.clone(),
        attempt,
        step: 0,
        line: 0,
        text: plan
            .and_then(|s| s.lines.first().cloned())
            .unwrap_or_default(),
    }))
    .await;
    let result = resolve(ctx, sink, deadline, cancel).await;
    if let Err(failed) = &result {
        sink.end_line(0).await;
        sink.system(0, &failed.reason).await;
    }
    sink.end_line(0).await;
    let (status, exit_code) = match &result {
        Ok(_) => (Status::Succeeded, 0),
        Err(f) => (f.status, f.exit_code),
    };
    let duration_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    sink.send(Payload::LineExited(LineExited {
        job: job.clone(),
        attempt,
        step: 0,
        line: 0,
        exit_code,
        duration_us,
    }))
    .await;
    sink.send(Payload::StepFinished(StepFinished {
        job,
        attempt,
        step: 0,
        status: status as i32,
        exit_code,
        duration_us,
    }))
    .await;
    result
}

fn failed(reason: String) -> Failed {
    Failed {
        status: Status::Failed,
        exit_code: 1,
        reason,
    }
}

async fn resolve(
    ctx: &JobContext,
    sink: &mut Sink,
    deadline: Option<Instant>,
    cancel: &CancellationToken,
) -> Result<String, Failed> {
    let spec = ctx.job.image_build.clone().unwrap_or_default();
    let Some(runtime) = &ctx.container else {
        return Err(failed(format!(
            "job {} builds its image from {} but this agent has no container engine; run it on \
             an agent started with --engine, or remove `image` to run on the host",
            ctx.job.id, spec.dockerfile
        )));
    };
    let Some(image) = &ctx.image else {
        return Err(failed(format!(
            "job {} builds its image from {} but its build context was not read (an agent \
             older than its pipeline?)",
            ctx.job.id, spec.dockerfile
        )));
    };
    let context = image.context.clone().map_err(failed)?;
    let tag = key::tag(&image.tenant, &image.project, &context.key);
    let engine = &runtime.engine;
    // One build of a key at a time in this process: a second job waits, then reuses.
    let _building = crate::image::lock(engine.address(), &tag).await;
    if let Some(found) = engine.find_image(&tag).await.map_err(failed)? {
        sink.system(
            0,
            &format!(
                "image {tag} is on the engine already (the same Dockerfile and context were \
                 built before): reused, nothing to build"
            ),
        )
        .await;
        sink.send(Payload::ImageReused(ImageReused {
            job: ctx.job.id.clone(),
            attempt: ctx.attempt,
            key: context.key.clone(),
            image: tag.clone(),
            image_id: found.id,
            bytes: found.bytes,
        }))
        .await;
        return Ok(tag);
    }
    sink.system(
        0,
        &format!(
            "building image {tag} from {} (context {}: {} files, {} bytes)",
            spec.dockerfile,
            spec.context,
            context.files.len(),
            context.bytes()
        ),
    )
    .await;
    let started = Instant::now();
    build(ctx, runtime, image, &context, &tag, sink, deadline, cancel).await?;
    let elapsed = started.elapsed();
    let found = engine
        .find_image(&tag)
        .await
        .map_err(failed)?
        .ok_or_else(|| {
            failed(format!(
                "the engine said it built {tag}, but has no image of that name"
            ))
        })?;
    sink.system(
        0,
        &format!(
            "built image {tag} in {:.1}s ({} bytes)",
            elapsed.as_secs_f64(),
            found.bytes
        ),
    )
    .await;
    sink.send(Payload::ImageBuilt(ImageBuilt {
        job: ctx.job.id.clone(),
        attempt: ctx.attempt,
        key: context.key.clone(),
        image: tag.clone(),
        image_id: found.id,
        duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        bytes: found.bytes,
        dockerfile: spec.dockerfile.clone(),
        context: spec.context.clone(),
    }))
    .await;
    prune_project(ctx, runtime, image, &context.key, sink).await;
    Ok(tag)
}

/// Builds the image, streaming the builder's output as the line's.
#[allow(clippy::too_many_arguments)]
async fn build(
    ctx: &JobContext,
    runtime: &ContainerRuntime,
    image: &crate::JobImage,
    context: &Arc<BuildContext>,
    tag: &str,
    sink: &mut Sink,
    deadline: Option<Instant>,
    cancel: &CancellationToken,
) -> Result<(), Failed> {
    let tar = {
        let context = context.clone();
        tokio::task::spawn_blocking(move || context.tar())
            .await
            .map_err(|e| failed(format!("cannot make the build context's tar: {e}")))?
            .map_err(|e| failed(format!("cannot make the build context's tar: {e}")))?
    };
    let labels = HashMap::from([
        (LABEL_TENANT.to_owned(), image.tenant.clone()),
        (LABEL_PROJECT.to_owned(), image.project.clone()),
        (LABEL_KEY.to_owned(), context.key.clone()),
        (
            LABEL_BUILT_US.to_owned(),
            tributary_proto::now_us().to_string(),
        ),
    ]);
    let mut stream =
        std::pin::pin!(runtime
            .engine
            .build_image(tar, &context.dockerfile_path, tag, labels));
    let timeout = ctx.job.timeout_secs;
    // The last step the builder announced (`STEP 2/3: RUN make`), for a failure's line.
    let mut announced: Option<(u32, String)> = None;
    let mut partial = String::new();
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            _ = cancel.cancelled() => {
                return Err(Failed { status: Status::Canceled, exit_code: -1, reason: "canceled".into() });
            }
            _ = sleep_opt(deadline) => {
                return Err(Failed {
                    status: Status::TimedOut,
                    exit_code: -1,
                    reason: format!("timed out after {timeout}s"),
                });
            }
            _ = sleep_opt(sink.flush_at) => {
                sink.flush(0).await;
                continue;
            }
        };
        let Some(message) = next else {
            return Ok(());
        };
        let info = match message {
            Ok(info) => info,
            // bollard turns the builder's error message into this error.
            Err(bollard::errors::Error::DockerStreamError { error }) => {
                return Err(failed(failure_reason(context, announced.as_ref(), &error)));
            }
            Err(e) => {
                return Err(failed(format!(
                    "the container engine failed while building {tag}: {e}"
                )))
            }
        };
        let error = info.error_detail.as_ref().map(|d| {
            d.message
                .clone()
                .unwrap_or_else(|| "the builder failed without a message".to_owned())
        });
        if let Some(error) = error {
            return Err(failed(failure_reason(context, announced.as_ref(), &error)));
        }
        let text = info.stream.or(info.status).unwrap_or_default();
        if text.is_empty() {
            continue;
        }
        partial.push_str(&text);
        while let Some(end) = partial.find('\n') {
            if let Some(step) = dockerfile::announced_step(&partial[..end]) {
                announced = Some(step);
            }
            partial.drain(..=end);
        }
        sink.output(0, STDOUT, text.as_bytes()).await;
        if sink.flush_at.is_some_and(|at| at <= Instant::now()) {
            sink.flush(0).await;
        }
    }
}

/// `image build failed at ci/Dockerfile:3 (RUN false): <the builder's message>`.
fn failure_reason(
    context: &BuildContext,
    announced: Option<&(u32, String)>,
    error: &str,
) -> String {
    let error = error.trim();
    let error = match error.char_indices().nth(MAX_REASON) {
        Some((i, _)) => format!("{}…", &error[..i]),
        None => error.to_owned(),
    };
    let instructions = dockerfile::instructions(&String::from_utf8_lossy(&context.dockerfile));
    let at = announced.and_then(|step| dockerfile::locate(&instructions, step));
    match at {
        Some(i) => format!(
            "image build failed at {}:{} ({}): {error}",
            context.spec.dockerfile, i.line, i.text
        ),
        None => format!("image build of {} failed: {error}", context.spec.dockerfile),
    }
}

/// Removes the project's images beyond the newest `image_keep` keys, each an ImagePruned
/// event; problems are notes in the log, never a failed job.
async fn prune_project(
    ctx: &JobContext,
    runtime: &ContainerRuntime,
    image: &crate::JobImage,
    current: &str,
    sink: &mut Sink,
) {
    let keep = runtime.limits.image_keep as usize;
    if keep == 0 {
        return;
    }
    let images = match runtime
        .engine
        .project_images(&image.tenant, &image.project)
        .await
    {
        Ok(images) => images,
        Err(e) => {
            sink.system(0, &format!("not pruning older images: {e}"))
                .await;
            return;
        }
    };
    for old in prune::beyond_newest(&images, keep, current) {
        if let Err(e) = runtime.engine.remove_image(&old.tag).await {
            sink.system(0, &format!("keeping {}: {e}", old.tag)).await;
            continue;
        }
        let reason = format!(
            "project {} keeps the images of its newest {keep} keys (--image-keep)",
            image.project
        );
        sink.system(0, &format!("removed image {} ({reason})", old.tag))
            .await;
        sink.send(Payload::ImagePruned(ImagePruned {
            job: ctx.job.id.clone(),
            attempt: ctx.attempt,
            key: old.key,
            image: old.tag,
            image_id: old.id,
            bytes: old.bytes,
            reason,
        }))
        .await;
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}
