//! A training event stored as a job's event: steps and evals in their columns (the whole
//! event as JSON beside them), the rest as JSON messages.

use crate::events::TrainEvent;
use loraloop_core::storage::{Db, NewTrainingEvent, TrainingEvent};
use std::collections::BTreeMap;

pub async fn store_event(db: &Db, id: i64, e: &TrainEvent) -> anyhow::Result<()> {
    let message;
    let ev = match e {
        TrainEvent::Started { total_steps, .. } => {
            db.set_job_progress_target(id, None, Some(*total_steps as i64))
                .await?;
            message = serde_json::to_string(e)?;
            NewTrainingEvent::message("state", &message)
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
            NewTrainingEvent::message("log", &message)
        }
    };
    db.add_training_event(id, &ev).await?;
    Ok(())
}

/// The header of [`results_csv`]: OpenAI's names for the step metrics.
pub const RESULTS_HEADER: &str =
    "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy";

/// A job's step metrics as OpenAI's results file: one row per training step in step order
/// (a step run again after a resume keeps its last numbers), the validation columns filled
/// where an evaluation ran at that step, empty otherwise.
pub fn results_csv(events: &[TrainingEvent]) -> String {
    #[derive(Default)]
    struct Row {
        loss: Option<f64>,
        accuracy: Option<f64>,
        valid_loss: Option<f64>,
        valid_accuracy: Option<f64>,
    }
    let field = |e: &TrainingEvent, key: &str| -> Option<f64> {
        let v: serde_json::Value = serde_json::from_str(e.message.as_deref()?).ok()?;
        v[key].as_f64()
    };
    let mut rows: BTreeMap<i64, Row> = BTreeMap::new();
    for e in events {
        let Some(step) = e.step else { continue };
        match e.kind.as_str() {
            "step" => {
                let r = rows.entry(step).or_default();
                r.loss = e.loss;
                r.accuracy = field(e, "accuracy");
            }
            "eval" => {
                let r = rows.entry(step).or_default();
                r.valid_loss = e.eval_loss;
                r.valid_accuracy = field(e, "accuracy");
            }
            _ => {}
        }
    }
    let cell = |x: Option<f64>| {
        x.filter(|x| x.is_finite())
            .map(|x| format!("{x:.6}"))
            .unwrap_or_default()
    };
    let mut out = String::from(RESULTS_HEADER);
    out.push('\n');
    for (step, r) in rows {
        out.push_str(&format!(
            "{step},{},{},{},{}\n",
            cell(r.loss),
            cell(r.accuracy),
            cell(r.valid_loss),
            cell(r.valid_accuracy)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, step: i64, loss: f64, message: &str) -> TrainingEvent {
        TrainingEvent {
            id: 0,
            job_id: 1,
            kind: kind.into(),
            step: Some(step),
            loss: (kind == "step").then_some(loss),
            eval_loss: (kind == "eval").then_some(loss),
            learning_rate: None,
            tokens_per_sec: None,
            message: Some(message.into()),
            created_at: String::new(),
        }
    }

    #[test]
    fn the_results_file_has_a_row_per_step_with_validation_where_it_ran() {
        let events = vec![
            event("step", 1, 2.5, r#"{"accuracy": 0.25}"#),
            event("step", 2, 2.0, r#"{"accuracy": 0.5}"#),
            event("eval", 2, 2.2, r#"{"accuracy": 0.4}"#),
            // A resume ran step 2 again: its last numbers stand.
            event("step", 2, 1.5, r#"{"accuracy": 0.75}"#),
            event("step", 3, 1.0, r#"{}"#),
        ];
        assert_eq!(
            results_csv(&events),
            "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy\n\
             1,2.500000,0.250000,,\n\
             2,1.500000,0.750000,2.200000,0.400000\n\
             3,1.000000,,,\n"
        );
    }
}
