//! A training event stored as a job's event: steps and evals in their columns (the whole
//! event as JSON beside them), the rest as JSON messages.

use crate::events::TrainEvent;
use loraloop_core::storage::{Db, NewTrainingEvent};

pub async fn store_event(db: &Db, id: i64, e: &TrainEvent) -> anyhow::Result<()> {
    let message;
    let ev = match e {
        TrainEvent::Started { total_steps, .. } => {
            db.set_job_progress_target(id, None, Some(*total_steps as i64))
                .await?;
            message = serde_json::to_string(e)?;
            NewTrainingEvent {
                kind: "state",
                message: Some(&message),
                ..Default::default()
            }
        }
        TrainEvent::Step {
            step,
            loss,
            learning_rate,
            tokens_per_sec,
            ..
        } => {
            // The whole event too: its accuracy and grad norm have no column.
            message = serde_json::to_string(e)?;
            NewTrainingEvent {
                kind: "step",
                step: Some(*step as i64),
                loss: Some(*loss),
                learning_rate: Some(*learning_rate),
                tokens_per_sec: Some(*tokens_per_sec),
                message: Some(&message),
                ..Default::default()
            }
        }
        TrainEvent::Eval {
            step, eval_loss, ..
        } => {
            message = serde_json::to_string(e)?;
            NewTrainingEvent {
                kind: "eval",
                step: Some(*step as i64),
                eval_loss: Some(*eval_loss),
                message: Some(&message),
                ..Default::default()
            }
        }
        other => {
            message = serde_json::to_string(other)?;
            NewTrainingEvent {
                kind: "log",
                message: Some(&message),
                ..Default::default()
            }
        }
    };
    db.add_training_event(id, &ev).await?;
    Ok(())
}
