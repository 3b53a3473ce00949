//! `/forget`: a user's messages, the replies to them and their ratings are deleted; every
//! dataset version holding any of it gets a successor without those rows and loses its
//! own (the version is deleted, or kept empty as the record of a training job that used
//! it); adapters trained on such a version are marked for the operator to retrain or
//! retire. Other people's messages are untouched, in any conversation.

use super::{Db, Result, sql};
use sha2::{Digest, Sha256};

/// What `/forget` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forgotten {
    /// The user's messages and the assistant's replies to them.
    pub messages: u64,
    pub ratings: u64,
    /// Dataset versions that held some of it: (old version id, its successor's id; None
    /// when nothing was left).
    pub datasets: Vec<(i64, Option<i64>)>,
    /// Adapters trained on such a version, now marked.
    pub adapters: Vec<i64>,
}

/// The hash of a dataset's stored rows given as their JSON lines: sha256 over each line
/// and a newline (the trainer's `content_hash` is this over the canonical lines).
pub fn lines_hash<S: AsRef<str>>(lines: impl IntoIterator<Item = S>) -> String {
    let mut hasher = Sha256::new();
    for line in lines {
        hasher.update(line.as_ref().as_bytes());
        hasher.update(b"\n");
    }
    hex::encode(hasher.finalize())
}

impl Db {
    /// Forget a user (see the module doc), in one transaction; the user stays excluded
    /// from every future dataset.
    pub async fn forget_user(&self, user_id: i64) -> Result<Forgotten> {
        let mut tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        // The user's messages, and each assistant message whose previous message in its
        // conversation is one of them (the reply to it).
        let doomed: Vec<(i64, i64)> = sql::all(
            &mut *tx,
            "select id, conversation_id from messages where user_id = ?1 and role = 'user'
             union
             select m.id, m.conversation_id from messages m
             where m.role = 'assistant' and (
                select p.user_id from messages p
                where p.conversation_id = m.conversation_id and p.id < m.id
                order by p.id desc limit 1) = ?1",
            (user_id,),
        )
        .await?;
        let ids: Vec<i64> = doomed.iter().map(|d| d.0).collect();
        let mut conversations: Vec<i64> = doomed.iter().map(|d| d.1).collect();
        conversations.sort_unstable();
        conversations.dedup();
        let ids_json = serde_json::to_string(&ids)?;
        let convs_json = serde_json::to_string(&conversations)?;

        let ratings = sql::execute(
            &mut *tx,
            "delete from feedback where user_id = ?1
                or message_id in (select value from json_each(?2))",
            (user_id, &ids_json),
        )
        .await?
        .rows_affected();

        // Dataset versions with rows from those conversations.
        let versions: Vec<(i64,)> = sql::all(
            &mut *tx,
            "select distinct dataset_id from dataset_examples
             where source_conversation_id in (select value from json_each(?1)) order by dataset_id",
            (&convs_json,),
        )
        .await?;
        let mut datasets = Vec::new();
        for (old,) in versions {
            let kept: Vec<(String, i64, Option<i64>, Option<i64>)> = sql::all(
                &mut *tx,
                "select messages, char_count, token_count, source_conversation_id from dataset_examples
                 where dataset_id = ?1 and (source_conversation_id is null
                    or source_conversation_id not in (select value from json_each(?2)))
                 order by position",
                (old, &convs_json),
            )
            .await?;
            let successor = if kept.is_empty() {
                None
            } else {
                let hash = lines_hash(kept.iter().map(|k| &k.0));
                // The same content under the same name is one version already.
                let existing: Option<(i64,)> = sql::optional(
                    &mut *tx,
                    "select id from datasets where content_hash = ?1
                       and name = (select name from datasets where id = ?2)",
                    (&hash, old),
                )
                .await?;
                match existing {
                    Some((id,)) => Some(id),
                    None => {
                        let (id,): (i64,) = sql::one(
                            &mut *tx,
                            "insert into datasets (name, version, content_hash, format, source, example_count, kind, assistant_id)
                             select name, (select max(version) + 1 from datasets d2 where d2.name = d.name),
                                    ?1, format, source, ?2, kind, assistant_id
                             from datasets d where id = ?3 returning id",
                            (&hash, kept.len() as i64, old),
                        )
                        .await?;
                        for (position, (line, chars, tokens, conv)) in kept.iter().enumerate() {
                            sql::execute(
                                &mut *tx,
                                "insert into dataset_examples (dataset_id, position, messages, char_count, token_count, source_conversation_id)
                                 values (?, ?, ?, ?, ?, ?)",
                                (id, position as i64, line, chars, tokens, conv),
                            )
                            .await?;
                        }
                        Some(id)
                    }
                }
            };
            sql::execute(
                &mut *tx,
                "delete from dataset_examples where dataset_id = ?",
                (old,),
            )
            .await?;
            // A job not started yet trains the successor; a job that ran keeps the (now
            // empty) version as its record.
            if let Some(new) = successor {
                sql::execute(
                    &mut *tx,
                    "update training_jobs set dataset_id = ?1
                     where dataset_id = ?2 and state in ('validating_files', 'queued')",
                    (new, old),
                )
                .await?;
            }
            let (used,): (i64,) = sql::one(
                &mut *tx,
                "select count(*) from training_jobs where dataset_id = ?",
                (old,),
            )
            .await?;
            if used == 0 {
                sql::execute(&mut *tx, "delete from datasets where id = ?", (old,)).await?;
            } else {
                sql::execute(
                    &mut *tx,
                    "insert into dataset_purges (dataset_id, successor_id) values (?, ?)
                     on conflict (dataset_id) do update set successor_id = excluded.successor_id",
                    (old, successor),
                )
                .await?;
            }
            datasets.push((old, successor));
        }
        let olds = serde_json::to_string(&datasets.iter().map(|d| d.0).collect::<Vec<_>>())?;
        let adapters: Vec<(i64,)> = sql::all(
            &mut *tx,
            "update adapters set forgotten_data_at = coalesce(forgotten_data_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
             where job_id in (select id from training_jobs where dataset_id in (select value from json_each(?1)))
             returning id",
            (&olds,),
        )
        .await?;

        let messages = sql::execute(
            &mut *tx,
            "delete from messages where id in (select value from json_each(?1))",
            (&ids_json,),
        )
        .await?
        .rows_affected();
        sql::execute(
            &mut *tx,
            "update conversations set excluded_from_training = 1 where user_id = ?",
            (user_id,),
        )
        .await?;
        sql::execute(
            &mut *tx,
            "update platform_users set excluded_from_training = 1, username = null, display_name = null,
                    forgotten_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') where id = ?",
            (user_id,),
        )
        .await?;
        tx.commit().await?;
        let mut adapters: Vec<i64> = adapters.into_iter().map(|a| a.0).collect();
        adapters.sort_unstable();
        Ok(Forgotten {
            messages,
            ratings,
            datasets,
            adapters,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ChatExample, ChatMessage, Role};
    use crate::storage::{JobState, NewAdapter, NewDataset, NewJob, NewMessage, Platform};
    use sqlx::SqlitePool;

    struct World {
        db: Db,
        assistant: i64,
    }

    impl World {
        async fn user(&self, id: &str) -> i64 {
            self.db
                .upsert_platform_user(Platform::Telegram, id, Some(id), None)
                .await
                .unwrap()
                .id
        }
        /// A conversation in a chat of its own, started by `by`.
        async fn conversation(&self, chat: &str, kind: &str, by: i64) -> i64 {
            let chat = self
                .db
                .upsert_chat(Platform::Telegram, chat, kind, None)
                .await
                .unwrap();
            self.db
                .current_conversation(self.assistant, chat, None, Some(by))
                .await
                .unwrap()
                .id
        }
        async fn say(&self, conv: i64, user: Option<i64>, text: &str) -> i64 {
            let role = if user.is_some() {
                Role::User
            } else {
                Role::Assistant
            };
            self.db
                .insert_message(&NewMessage {
                    conversation_id: conv,
                    role,
                    content: text,
                    user_id: user,
                    platform_message_id: None,
                    adapter_id: None,
                    adapter_name: None,
                    prompt_tokens: None,
                    completion_tokens: None,
                })
                .await
                .unwrap()
                .id
        }
        async fn dataset(&self, name: &str, rows: &[(&str, i64)]) -> i64 {
            let examples: Vec<ChatExample> = rows
                .iter()
                .map(|(t, _)| ChatExample {
                    messages: vec![
                        ChatMessage::new(Role::User, *t),
                        ChatMessage::new(Role::Assistant, "ok"),
                    ],
                })
                .collect();
            let convs: Vec<Option<i64>> = rows.iter().map(|r| Some(r.1)).collect();
            let hash = lines_hash(examples.iter().map(ChatExample::to_json_line));
            self.db
                .insert_dataset(&NewDataset {
                    name,
                    format: "conversations",
                    source: "{}",
                    content_hash: &hash,
                    examples: &examples,
                    source_conversations: &convs,
                    ..Default::default()
                })
                .await
                .unwrap()
                .dataset()
                .id
        }
        async fn job(&self, dataset: i64, state: JobState) -> i64 {
            let job = self
                .db
                .create_job(&NewJob {
                    dataset_id: dataset,
                    base_model: "m",
                    method: "lora",
                    hyperparameters: &serde_json::json!({}),
                    assistant_id: Some(self.assistant),
                })
                .await
                .unwrap();
            sql::execute(
                self.db.pool(),
                "update training_jobs set state = ? where id = ?",
                (state.as_str(), job.id),
            )
            .await
            .unwrap();
            job.id
        }
    }

    async fn texts(db: &Db, conv: i64) -> Vec<String> {
        sqlx::query_scalar("select content from messages where conversation_id = ? order by id")
            .bind(conv)
            .fetch_all(db.pool())
            .await
            .unwrap()
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn forget_takes_exactly_the_users_data_out_of_chats_datasets_and_adapters(
        pool: SqlitePool,
    ) {
        let db = Db::from_pool(pool);
        let assistant = db
            .ensure_assistant("loraloop", "m", "Be nice.")
            .await
            .unwrap()
            .id;
        let w = World {
            db: db.clone(),
            assistant,
        };
        let (ann, bob) = (w.user("ann").await, w.user("bob").await);
        // A group Bob started, where Ann also wrote; a group Ann started, where Bob also
        // wrote; Ann's private chat; a chat of Bob's alone.
        let bobs_group = w.conversation("-1", "group", bob).await;
        w.say(bobs_group, Some(bob), "bob 1").await;
        let to_bob = w.say(bobs_group, None, "reply to bob 1").await;
        w.say(bobs_group, Some(ann), "ann's secret").await;
        let to_ann = w.say(bobs_group, None, "reply to ann's secret").await;
        w.say(bobs_group, Some(bob), "bob 2").await;
        w.say(bobs_group, None, "reply to bob 2").await;
        let anns_group = w.conversation("-2", "group", ann).await;
        w.say(anns_group, Some(ann), "ann opens").await;
        w.say(anns_group, None, "reply to ann opens").await;
        w.say(anns_group, Some(bob), "bob answers ann").await;
        let to_bob_in_anns = w.say(anns_group, None, "reply to bob in ann's group").await;
        let private = w.conversation("ann", "private", ann).await;
        w.say(private, Some(ann), "ann private").await;
        w.say(private, None, "reply to ann private").await;
        let bob_alone = w.conversation("bob", "private", bob).await;
        w.say(bob_alone, Some(bob), "bob alone").await;
        w.say(bob_alone, None, "reply to bob alone").await;
        db.set_feedback(to_bob, "telegram:bob", Some(bob), Some(1), None)
            .await
            .unwrap();
        db.set_feedback(to_ann, "telegram:bob", Some(bob), Some(1), None)
            .await
            .unwrap();
        db.set_feedback(to_bob_in_anns, "telegram:ann", Some(ann), Some(-1), None)
            .await
            .unwrap();

        // "chats" v1 mixes everyone; a finished job trained it into an adapter, a queued
        // one waits on it. "ann-only" holds only Ann's chat; "bob" only Bob's.
        let chats = w
            .dataset(
                "chats",
                &[("g", bobs_group), ("p", private), ("b", bob_alone)],
            )
            .await;
        let trained = w.job(chats, JobState::Succeeded).await;
        let waiting = w.job(chats, JobState::Queued).await;
        let adapter = db
            .insert_adapter(&NewAdapter {
                name: "a1",
                path: "/x",
                base_model: "m",
                base_model_hash: "h",
                tokenizer_hash: "t",
                chat_template_hash: "c",
                rank: Some(4),
                alpha: Some(8.0),
                target_modules: &[],
                metrics: &serde_json::json!({}),
                job_id: Some(trained),
                assistant_id: Some(assistant),
            })
            .await
            .unwrap();
        let ann_only = w.dataset("ann-only", &[("p", private)]).await;
        let bobs = w.dataset("bob", &[("b", bob_alone)]).await;

        let f = db.forget_user(ann).await.unwrap();

        // Ann's messages and the replies to them: 3 messages + 3 replies.
        assert_eq!(f.messages, 6);
        assert_eq!(
            texts(&db, bobs_group).await,
            ["bob 1", "reply to bob 1", "bob 2", "reply to bob 2"]
        );
        assert_eq!(
            texts(&db, anns_group).await,
            ["bob answers ann", "reply to bob in ann's group"]
        );
        assert!(texts(&db, private).await.is_empty());
        assert_eq!(
            texts(&db, bob_alone).await,
            ["bob alone", "reply to bob alone"]
        );
        // Ann's rating and the rating of the reply to her go; Bob's own rating stays.
        assert_eq!(f.ratings, 2);
        let left: Vec<(i64, String)> =
            sql::all(db.pool(), "select message_id, rater from feedback", ())
                .await
                .unwrap();
        assert_eq!(left, [(to_bob, "telegram:bob".to_string())]);

        // "chats": a v2 with Bob's chat alone; v1 stays empty for the job that ran on it,
        // the queued job now trains v2, the adapter is marked. "ann-only" is gone.
        let (_, successor) = f.datasets[0];
        let v2 = db.dataset_by_id(successor.unwrap()).await.unwrap();
        assert_eq!(
            (v2.name.as_str(), v2.version, v2.example_count),
            ("chats", 2, 1)
        );
        assert_eq!(db.dataset_conversations(v2.id).await.unwrap(), [bob_alone]);
        let lines = db.dataset_lines(v2.id).await.unwrap();
        assert_eq!(v2.content_hash, lines_hash(&lines));
        assert!(db.dataset_lines(chats).await.unwrap().is_empty());
        assert_eq!(db.job(trained).await.unwrap().dataset_id, Some(chats));
        assert_eq!(db.job(waiting).await.unwrap().dataset_id, Some(v2.id));
        assert_eq!(f.datasets, [(chats, Some(v2.id)), (ann_only, None)]);
        assert!(db.dataset_by_id(ann_only).await.is_err());
        assert_eq!(db.dataset_lines(bobs).await.unwrap().len(), 1, "untouched");
        assert_eq!(f.adapters, [adapter.id]);
        assert!(
            db.adapter(adapter.id)
                .await
                .unwrap()
                .forgotten_data_at
                .is_some()
        );
        // No copy of Ann's text anywhere in the dataset rows.
        let rows: Vec<String> = sqlx::query_scalar("select messages from dataset_examples")
            .fetch_all(db.pool())
            .await
            .unwrap();
        assert!(
            rows.iter()
                .all(|r| !r.contains("\"g\"") && !r.contains("\"p\"")),
            "{rows:?}"
        );
        // She stays out of every future dataset.
        let again = db
            .upsert_platform_user(Platform::Telegram, "ann", None, None)
            .await
            .unwrap();
        assert!(again.excluded_from_training);
    }
}
